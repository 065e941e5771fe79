"""Code shards to training batches: the shard format, storage helpers and the streaming loader.

`from argen.data_pipeline import DataConfig, build_loader` works; the loader (and torch) is imported only when
one of those names is used, so the tokenizer's imports of shard_format stay light.
"""
from __future__ import annotations

from typing import Any

_LAZY = {"DataConfig": "loader", "DatasetSpec": "loader", "ShardLoader": "loader", "build_loader": "loader",
         "RetryConfig": "retry"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"argen.data_pipeline.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'argen.data_pipeline' has no attribute {name!r}")


__all__ = list(_LAZY)
