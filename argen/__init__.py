"""argen: LlamaGen-style autoregressive image generation at scale."""
__version__ = "0.1.0"


def generate(*args, **kwargs):
    """KV-cached CFG sampling; see argen.model.generate.generate."""
    from argen.model.generate import generate as _generate
    return _generate(*args, **kwargs)
