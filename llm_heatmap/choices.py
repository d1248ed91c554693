"""Every set of named choices the library accepts, defined once; the rooms check against them and the CLI
offers them (this module imports nothing, so `--help` reads them without loading torch)."""

WEIGHTINGS = ("weights", "norms")  # what a cube's pattern holds: attention weights, or weights x value norms
SCALES = ("auto", "linear", "log", "power", "row")  # colour scales of a drawn grid
SINK_MODES = ("keep", "exclude", "mask")  # what a drawing does with the first-token column
BACKGROUNDS = ("white", "transparent")  # the page behind a drawn grid
PROJECTIONS = ("pca", "tsne", "umap")  # how a query-key map projects queries and keys to the plane
DTYPES = ("float32", "float16", "bfloat16")  # weight dtypes offered when loading a model
QUANTIZE = ("4bit", "8bit")  # bitsandbytes quantization offered when loading a model
ATTENTION_OUTPUTS = ("auto", "computed", "model")  # who computes attention's output during a capture (probes.capture)
SITES = ("self", "encoder", "decoder", "cross", "vision", "text")  # attention sites (models.sites.SITE_ORDER)
STEP_SITES = ("decoder", "cross")  # the sites an encoder-decoder's decode steps run through (probes.decode_sites)
