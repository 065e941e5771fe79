"""The process layout tp x pp x dp over megatron-core's `parallel_state`, and the mpu adapter DeepSpeed expects.

Rank order is megatron-core's default (tp fastest, then dp, then pp), which is also the order of DeepSpeed's
`PipeModelDataParallelTopology(num_pp, num_mp, num_dp)` (axes pipe, data, model): both agree on every rank's
coordinates, so megatron's TP groups and DeepSpeed's pipeline/data groups describe the same processes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from argen.errors import ArgenError

if TYPE_CHECKING:
    from argen.model.gpt import GPTConfig


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero: int = 0

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def __str__(self) -> str:
        return f"tp={self.tp} pp={self.pp} dp={self.dp} zero={self.zero}"

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def coords(self, rank: int) -> dict[str, int]:
        """(tp, dp, pp) coordinates of a global rank in megatron's default order tp-dp-pp."""
        return {"tp": rank % self.tp, "dp": (rank // self.tp) % self.dp, "pp": rank // (self.tp * self.dp)}

    def to_dict(self) -> dict:
        return asdict(self)


def check_layout_divisibility(gcfg: GPTConfig, tp: int, pp: int) -> None:
    """Model-shape rules of a layout, shared by `argen train` (config validation and `parallelize`) and
    `argen plan`: tp divides the attention heads, the FFN hidden size and the vocabulary; pp divides the layers.
    Raises ValueError (callers outside config validation turn it into an ArgenError). The world-size rule is
    checked separately (`resolve_layout`), once the world size is known."""
    if gcfg.n_head % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide the {gcfg.n_head} attention heads of {gcfg.name}")
    if gcfg.ffn_hidden % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide the FFN hidden size {gcfg.ffn_hidden} of {gcfg.name}")
    if gcfg.vocab_size % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide vocab_size {gcfg.vocab_size} of {gcfg.name}")
    if gcfg.n_layer % pp:
        raise ValueError(f"parallel.pp: {pp} does not divide the {gcfg.n_layer} layers of {gcfg.name}")


def resolve_layout(tp: int, pp: int, dp: int, zero: int, world_size: int) -> Layout:
    """dp = 0 means 'whatever is left'; the product must equal the world size."""
    if world_size % (tp * pp):
        raise ArgenError(f"parallel.tp x parallel.pp = {tp} x {pp} does not divide the world size {world_size}")
    if dp == 0:
        dp = world_size // (tp * pp)
    if tp * pp * dp != world_size:
        raise ArgenError(f"parallel.dp: tp x pp x dp = {tp} x {pp} x {dp} = {tp * pp * dp} "
                         f"but the job has {world_size} processes")
    return Layout(tp, pp, dp, zero)


def init_model_parallel(layout: Layout) -> None:
    """Create megatron-core's TP/PP/DP groups on the default process group's backend (NCCL or gloo)."""
    from megatron.core import parallel_state as ps
    if ps.model_parallel_is_initialized():
        if (ps.get_tensor_model_parallel_world_size() == layout.tp
                and ps.get_pipeline_model_parallel_world_size() == layout.pp):
            return
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp)


def destroy_model_parallel() -> None:
    try:
        from megatron.core import parallel_state as ps
    except ImportError:  # pragma: no cover
        return
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()


class MegatronMPU:
    """The legacy Megatron `mpu` API DeepSpeed calls, over megatron.core.parallel_state.

    DeepSpeed asks for get_model_parallel_{rank,world_size,group} (the tensor-parallel group; pipeline stages are
    reduced by DeepSpeed's own pipeline engine) and get_data_parallel_*; everything else is passed through.
    """

    def __init__(self, ps=None):
        if ps is None:
            from megatron.core import parallel_state as ps
        self.ps = ps

    def __getattr__(self, name):
        return getattr(self.ps, name)

    def get_model_parallel_rank(self):
        return self.ps.get_tensor_model_parallel_rank()

    def get_model_parallel_world_size(self):
        return self.ps.get_tensor_model_parallel_world_size()

    def get_model_parallel_group(self):
        return self.ps.get_tensor_model_parallel_group()
