"""Fast sampling: a continuous-batching engine over a static KV cache, and an HTTP server on top of it."""
from argen.serve.engine import Engine, Request, Result

__all__ = ["Engine", "Request", "Result"]
