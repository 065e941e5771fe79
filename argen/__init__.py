"""argen: LlamaGen-style autoregressive image generation at scale."""
__version__ = "0.1.0"
