"""Tensor parallelism: swap the plain GPT's linears/embeddings for megatron-core layers, sharding the weights.

The plain model is built (and seeded) whole on every rank, then each layer is replaced by its megatron-core
counterpart holding this rank's slice of the *same* weights, so a run's initial weights do not depend on the layout.

    layer                              megatron-core layer                      slice of the full weight
    tok_embeddings   (V, d)            VocabParallelEmbedding                   rows [r*V/tp, (r+1)*V/tp)
    attention.wqkv   (3d, d) [q; k; v] ColumnParallelLinear(gather_output=F)    this rank's heads of q, of k, of v
    attention.wo     (d, d)            RowParallelLinear(input_is_parallel=T)   columns of this rank's heads
    feed_forward.w1/w3 (h, d)          ColumnParallelLinear                     rows [r*h/tp, (r+1)*h/tp)
    feed_forward.w2  (d, h)            RowParallelLinear                        columns [r*h/tp, (r+1)*h/tp)
    output           (V, d)            ColumnParallelLinear                     rows (vocab shard) -> vocab-parallel
                                                                                logits for vocab_parallel_cross_entropy
Norms, the class table and the caption MLP stay replicated. `shard`/`unshard` are the same rules for checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn

# plain-model parameter name suffix -> (split dim, qkv?)
_RULES: tuple[tuple[str, int, bool], ...] = (
    ("attention.wqkv.weight", 0, True),
    ("attention.wo.weight", 1, False),
    ("feed_forward.w1.weight", 0, False),
    ("feed_forward.w3.weight", 0, False),
    ("feed_forward.w2.weight", 1, False),
    ("tok_embeddings.weight", 0, False),
    ("output.weight", 0, False),
)


def shard_rule(name: str) -> tuple[int, bool] | None:
    """(split dim, is_qkv) for a tensor-parallel parameter name, None when it is replicated."""
    for suffix, dim, qkv in _RULES:
        if name == suffix or name.endswith("." + suffix):
            return dim, qkv
    return None


def shard(name: str, full: torch.Tensor, tp: int, rank: int) -> torch.Tensor:
    """This rank's slice of a full (consolidated) tensor."""
    rule = shard_rule(name)
    if rule is None or tp == 1:
        return full
    dim, qkv = rule
    if qkv:
        three = full.view(3, full.shape[0] // 3, *full.shape[1:])
        return three.chunk(tp, dim=1)[rank].reshape(-1, *full.shape[1:]).clone()
    return full.chunk(tp, dim=dim)[rank].clone()


def unshard(name: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """The full tensor from all TP ranks' slices (index = tp rank)."""
    rule = shard_rule(name)
    if rule is None or len(shards) == 1:
        return shards[0]
    dim, qkv = rule
    if qkv:
        parts = [s.view(3, s.shape[0] // 3, *s.shape[1:]) for s in shards]
        full = torch.cat(parts, dim=1)
        return full.reshape(-1, *full.shape[2:])
    return torch.cat(shards, dim=dim)


def _mcore():
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    return ModelParallelConfig, ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


_classes: dict[str, type] = {}


def _tp_classes():
    """Thin subclasses returning a tensor instead of megatron's (output, bias) pair, so the plain forward runs as is."""
    if not _classes:
        _, Col, Row, _Emb = _mcore()

        class ColumnLinear(Col):
            def forward(self, x):  # noqa: D401
                return super().forward(x)[0]

        class RowLinear(Row):
            def forward(self, x):
                return super().forward(x)[0]

        _classes.update(col=ColumnLinear, row=RowLinear)
    return _classes["col"], _classes["row"]


def _noinit(_w):
    return None


def apply_tensor_parallel(model: nn.Module, tp: int, tp_rank: int) -> nn.Module:
    """Replace the GPT's layers in place with megatron-core TP layers holding this rank's weight slices."""
    if tp == 1:
        return model
    MPConfig, _, _, VocabEmb = _mcore()
    Col, Row = _tp_classes()
    dtype = model.output.weight.dtype
    mpc = MPConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True, perform_initialization=False,
                   params_dtype=dtype)

    from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

    def fill(new: nn.Module, name: str, full: torch.Tensor) -> nn.Module:
        new.weight.data.copy_(shard(name, full, tp, tp_rank))
        # megatron marks TP weights only when it initialises them itself; DeepSpeed's grad-norm needs the mark to
        # count a TP shard on every rank (replicated weights count once)
        set_tensor_model_parallel_attributes(new.weight, True, shard_rule(name)[0], 1)
        return new

    def col(lin: nn.Linear, name: str) -> nn.Module:
        new = Col(lin.in_features, lin.out_features, config=mpc, init_method=_noinit, bias=False, gather_output=False)
        return fill(new, name, lin.weight.data)

    def row(lin: nn.Linear, name: str) -> nn.Module:
        new = Row(lin.in_features, lin.out_features, config=mpc, init_method=_noinit, bias=False,
                  input_is_parallel=True, skip_bias_add=False)
        return fill(new, name, lin.weight.data)

    emb = model.tok_embeddings
    new_emb = VocabEmb(emb.num_embeddings, emb.embedding_dim, init_method=_noinit, config=mpc)
    model.tok_embeddings = fill(new_emb, "tok_embeddings.weight", emb.weight.data)
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.feed_forward
        att.wqkv = col(att.wqkv, "attention.wqkv.weight")
        att.wo = row(att.wo, "attention.wo.weight")
        att.n_head = att.n_head // tp  # local heads; head_dim is unchanged
        ffn.w1 = col(ffn.w1, "feed_forward.w1.weight")
        ffn.w3 = col(ffn.w3, "feed_forward.w3.weight")
        ffn.w2 = row(ffn.w2, "feed_forward.w2.weight")
    model.output = col(model.output, "output.weight")
    model.tensor_parallel = tp
    return model


def parallel_loss(logits: torch.Tensor, codes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """gpt_loss over vocab-parallel logits (B, N, V/tp): megatron-core's vocab_parallel_cross_entropy."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    # it rewrites its input in place; clone so callers' logits stay intact
    ce = vocab_parallel_cross_entropy(logits.float().clone(), codes)
    if valid is None:
        return ce.mean()
    w = valid.to(ce.dtype)[:, None].expand_as(ce)
    return (ce * w).sum() / w.sum().clamp(min=1.0)
