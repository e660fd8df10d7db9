"""llamagen_core2: a fast LlamaGen-compatible AR image generator with CoRe^2 guidance."""
__version__ = "0.1.0"
