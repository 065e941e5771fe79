"""Distributed training over the plain model: layout/topology (megatron-core parallel_state), tensor-parallel layer
swaps, DeepSpeed pipeline stages, activation checkpointing and the DeepSpeed ZeRO engine, applied by `parallelize`.

Importing this package imports neither megatron-core nor DeepSpeed; they load only when a layout needs them, so the
single-process path pays nothing for them.
"""
from argen.parallel.parallelize import Parallelized, parallelize
from argen.parallel.topology import Layout, MegatronMPU, resolve_layout

__all__ = ["Layout", "MegatronMPU", "Parallelized", "parallelize", "resolve_layout"]
