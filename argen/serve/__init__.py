"""Fast sampling: a continuous-batching engine over a static KV cache, and an HTTP server on top of it."""
from argen.serve.engine import Engine, EngineBusy, Request, Result

__all__ = ["Engine", "EngineBusy", "Request", "Result"]
