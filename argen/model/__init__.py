"""Plain nn.Modules: the GPT family, the VQ tokenizer, the model zoo, import and export. No distributed code."""
from argen.model.io import build, load, save

__all__ = ["build", "load", "save"]
