"""`argen plan`: predict per-GPU memory of a training layout, and suggest layouts that fit.

The model is analytic (no GPU needed): it counts the bytes each rank holds for parameters, gradients and AdamW
states under ZeRO 0/1/2/3, the ZeRO working buffers, and the activations autograd saves for backward in this GPT
(argen/model/gpt.py), op by op, plus the transient tensors at the three moments that can set the peak (the
cross-entropy backward at the head, the backward of a transformer block, the optimizer step). Its formulas are
written out in the README ('argen plan'). `measure_training_step` measures the same quantity on CPU (live tensor bytes, tracked
with a TorchDispatchMode) so tests and benchmarks/plan_accuracy.py can compare the two.

Layout rules (the same ones `argen train` enforces): tp * pp * dp = gpus; the model-shape rules of
argen.parallel.topology.check_layout_divisibility (tp divides the attention heads, the FFN hidden size and the
vocabulary, pp divides the layers); and ZeRO-2/3 cannot be combined with pipeline parallelism (DeepSpeed refuses
it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from argen.errors import ArgenError
from argen.parallel.topology import Layout, check_layout_divisibility
from argen.model.gpt import GPT_SIZES, GPTConfig, gpt_config

GiB = 1024 ** 3
DS_BUCKET_ELEMS = 500_000_000   # DeepSpeed's default reduce/allreduce bucket size (elements)
DEFAULT_HEADROOM = 0.10          # fraction of GPU memory kept free: CUDA context, NCCL buffers, fragmentation


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything besides the layout that changes memory."""
    micro_batch: int = 1
    global_batch: int = 256
    precision: Literal["bf16", "fp32"] = "bf16"
    checkpointing: int = 0          # 0 = off, 1 = every block ("full"), n = blocks 0, n, 2n, ... recomputed
    attention: Literal["flash", "math"] = "flash"   # flash: flash-attn / SDPA flash or mem-efficient (no S x S saved)
    # 'gpu': native_dropout keeps 1-byte masks; AdamW runs foreach (one fp32 temporary per optimizer element).
    # 'cpu': dropout keeps a mask in the activation dtype; AdamW runs per tensor (temporaries of the largest param).
    device: Literal["gpu", "cpu"] = "gpu"
    # 'deepspeed': gradient buffers exist for the whole step, the pipeline/engine keeps the logits referenced.
    # 'torch': a plain loop with zero_grad(set_to_none=True): gradients appear during backward.
    engine: Literal["deepspeed", "torch"] = "deepspeed"

    @property
    def act_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


def parse_checkpointing(value: str | int) -> int:
    """'off' -> 0, 'full'/'every_block' -> 1, 'every-N'/'every_N' -> N."""
    if isinstance(value, int):
        if value < 0:
            raise ArgenError(f"activation checkpointing: expected >= 0, got {value}")
        return value
    v = str(value).strip().lower().replace("_", "-")
    if v in ("off", "none", "0", "false"):
        return 0
    if v in ("full", "on", "every-block", "all", "1", "true"):
        return 1
    if v.startswith("every-"):
        try:
            n = int(v[len("every-"):])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise ArgenError(f"activation checkpointing '{value}': expected off, full or every-N (N >= 1, e.g. every-2)")


def checkpointing_name(n: int) -> str:
    return "off" if n == 0 else "full" if n == 1 else f"every-{n}"


def model_config(name: str, image_size: int = 256, model_type: str = "c2i", seq: int | None = None,
                 **overrides) -> GPTConfig:
    """A GPTConfig from a zoo name (or 'custom' with n_layer/n_head/dim overrides) at a resolution or token count.

    `seq` may be the number of image tokens (a square: 256, 576, 1024) or the training sequence length
    (prefix + image tokens - 1: 256, 576, 1024 for c2i; 375, ... for t2i).
    """
    if model_type not in ("c2i", "t2i"):
        raise ArgenError(f"model type '{model_type}': expected c2i or t2i")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if seq is not None:
        prefix = 120 if model_type == "t2i" else 1
        if seq >= 1 and math.isqrt(seq) ** 2 == seq:
            block = seq
        elif seq - prefix + 1 >= 1 and math.isqrt(seq - prefix + 1) ** 2 == seq - prefix + 1:
            block = seq - prefix + 1
        else:
            raise ArgenError(f"--seq {seq}: neither a square number of image tokens (e.g. 256, 576, 1024) nor a "
                             f"training sequence length prefix({prefix}) + tokens - 1")
        overrides["block_size"] = block
    if name == "custom" or name not in GPT_SIZES and {"n_layer", "n_head", "dim"} <= overrides.keys():
        if not {"n_layer", "n_head", "dim"} <= overrides.keys():
            raise ArgenError("model 'custom' needs --n-layer, --n-head and --dim")
        base = GPTConfig(name=name, model_type=model_type,  # type: ignore[arg-type]
                         cls_token_num=120 if model_type == "t2i" else 1,
                         block_size=(image_size // 16) ** 2)
        try:
            cfg = replace(base, **overrides)
            cfg.validate()
        except (TypeError, ValueError) as e:
            raise ArgenError(f"model: {e}") from None
        return cfg
    try:
        return gpt_config(name, image_size=image_size, model_type=model_type, **overrides)
    except ValueError as e:
        if isinstance(e, ArgenError):
            raise
        raise ArgenError(f"model {name}: {e}") from None


def check_layout(cfg: GPTConfig, layout: Layout, settings: Settings | None = None, gpus: int | None = None) -> None:
    """Raise ArgenError, naming the numbers, for a layout `argen train` could not run."""
    for key in ("tp", "pp", "dp"):
        if getattr(layout, key) < 1:
            raise ArgenError(f"{key} must be >= 1, got {getattr(layout, key)}")
    if layout.zero not in (0, 1, 2, 3):
        raise ArgenError(f"zero stage must be 0, 1, 2 or 3, got {layout.zero}")
    if gpus is not None and gpus % (layout.tp * layout.pp):
        raise ArgenError(f"{gpus} GPUs are not divisible by tp*pp = {layout.tp}*{layout.pp} = {layout.tp * layout.pp}")
    try:
        check_layout_divisibility(cfg, layout.tp, layout.pp)
    except ValueError as e:
        raise ArgenError(str(e)) from None
    if layout.pp > 1 and layout.zero > 1:
        raise ArgenError(f"ZeRO-{layout.zero} cannot be combined with pipeline parallelism (pp={layout.pp}); "
                         "DeepSpeed allows ZeRO 0 or 1 with pipelines")
    if settings is not None:
        if settings.micro_batch < 1:
            raise ArgenError(f"micro-batch must be >= 1, got {settings.micro_batch}")
        if settings.global_batch % (settings.micro_batch * layout.dp):
            raise ArgenError(f"global batch {settings.global_batch} is not divisible by micro-batch * dp = "
                             f"{settings.micro_batch}*{layout.dp}")


# ---------------------------------------------------------------------------------------------------------------
# parameter counts
# ---------------------------------------------------------------------------------------------------------------
def layer_params(cfg: GPTConfig, tp: int = 1) -> int:
    """One transformer block on one TP rank: wqkv, wo, w1, w3, w2 split by tp; the two RMSNorm weights replicated."""
    d, h = cfg.dim, cfg.ffn_hidden
    return (4 * d * d + 3 * d * h) // tp + 2 * d


def embedding_params(cfg: GPTConfig, tp: int = 1) -> int:
    """Stage 0 extras: token embedding (vocab-parallel) and the condition embedding (replicated)."""
    cond = (cfg.num_classes + (1 if cfg.class_dropout_prob > 0 else 0)) * cfg.dim if cfg.model_type == "c2i" \
        else cfg.caption_dim * cfg.dim + cfg.dim * cfg.dim
    return cfg.vocab_size * cfg.dim // tp + cond


def head_params(cfg: GPTConfig, tp: int = 1) -> int:
    """Last-stage extras: final RMSNorm (replicated) and the output projection (vocab-parallel)."""
    return cfg.dim + cfg.vocab_size * cfg.dim // tp


def total_params(cfg: GPTConfig) -> int:
    return cfg.n_layer * layer_params(cfg) + embedding_params(cfg) + head_params(cfg)


# ---------------------------------------------------------------------------------------------------------------
# activations (bytes per micro-batch on one TP rank)
# ---------------------------------------------------------------------------------------------------------------
def _mask_bytes(p: float, s: Settings) -> int:
    if p <= 0:
        return 0
    return 1 if s.device == "gpu" else s.act_bytes


def layer_activation_bytes(cfg: GPTConfig, b: int, tp: int, s: Settings) -> int:
    """Bytes one block saves for backward (no checkpointing).

    Per token, e = activation bytes, two RMSNorms each keep an fp32 copy of their input (the input itself in fp32),
    the normalized tensor and the output: 2(4 + 2e)d. Attention keeps the fused qkv output (v is a view of it), the
    rotated q and k, and the attention output: 6e d/tp, plus the fp32 log-sum-exp per head. The SwiGLU FFN keeps
    w1 x, silu(w1 x), w3 x and their product: 4e h/tp. Residual and FFN dropout keep masks. The math attention
    backend also keeps the S x S probabilities; a t2i padding mask becomes an additive bias kept by every block.
    """
    S, d, h, e = cfg.seq_len, cfg.dim, cfg.ffn_hidden, s.act_bytes
    tokens = b * S
    per_token = 2 * (4 + 2 * e) * d + 6 * e * d // tp + 4 * e * h // tp
    per_token += (_mask_bytes(cfg.resid_dropout_p, s) + _mask_bytes(cfg.ffn_dropout_p, s)) * d
    total = tokens * per_token + 4 * b * (cfg.n_head // tp) * S     # log-sum-exp
    if s.attention == "math":
        total += b * (cfg.n_head // tp) * S * S * e
    if cfg.model_type == "t2i":
        total += b * S * S * e                                     # bool padding mask -> additive bias
    return total


def checkpointed_layer_bytes(cfg: GPTConfig, b: int, s: Settings) -> int:
    """A recomputed block keeps only its input."""
    return b * cfg.seq_len * cfg.dim * s.act_bytes


def block_backward_moments(cfg: GPTConfig, b: int, tp: int, s: Settings) -> dict[str, tuple[int, int]]:
    """The two moments inside one block's backward that can set the peak, as (activation bytes released from the
    block's saved set, extra gradient bytes alive) relative to 'all of the block's saved tensors alive':

    - 'SwiGLU backward': w2's backward has released the product and the FFN dropout mask; alive are the output
      gradient (bsd), the product's gradient and the gradients of both factors (3 bsh/tp).
    - 'attention backward': the FFN's saved tensors are gone; alive are the residual gradient, the attention output
      gradient and SDPA's q, k, v gradients (5 bsd; q, k, v and the output split by tp).
    """
    T, d, h, e = b * cfg.seq_len, cfg.dim, cfg.ffn_hidden, s.act_bytes
    mask_f = _mask_bytes(cfg.ffn_dropout_p, s) * T * d
    ffn_saved = T * (4 + 2 * e) * d + 4 * e * T * h // tp + mask_f
    return {
        "SwiGLU backward": (e * T * h // tp + mask_f, e * T * d + 3 * e * T * h // tp),
        "attention backward": (ffn_saved, 2 * e * T * d + 3 * e * T * d // tp),
    }


def embedding_activation_bytes(cfg: GPTConfig, b: int, s: Settings) -> int:
    """Stage 0: token indices, the token-dropout mask and (t2i) the caption MLP's inputs."""
    S, e = cfg.seq_len, s.act_bytes
    total = b * (cfg.block_size - 1) * 8 + b * S * cfg.dim * _mask_bytes(cfg.token_dropout_p, s)
    if cfg.model_type == "t2i":
        total += b * cfg.cls_token_num * (cfg.caption_dim + 2 * cfg.dim) * e
    return total


def logits_bytes(cfg: GPTConfig, b: int, tp: int) -> int:
    """One fp32 copy of the (vocab-parallel) logits: B * N * V / tp * 4."""
    return b * cfg.block_size * (cfg.vocab_size // tp) * 4


def head_activation_bytes(cfg: GPTConfig, b: int, tp: int, s: Settings) -> int:
    """Last stage: the final RMSNorm's saved tensors and the fp32 log-softmax the cross entropy keeps
    (plus the logits themselves when the engine keeps its outputs referenced)."""
    N, d, e = cfg.block_size, cfg.dim, s.act_bytes
    norm_in = b * cfg.seq_len * d * 4 if s.precision == "fp32" else b * N * d * 4   # fp32 view keeps the whole x
    total = norm_in + 2 * b * N * d * e + logits_bytes(cfg, b, tp)
    if s.engine == "deepspeed":
        total += logits_bytes(cfg, b, tp)
    return total


def head_backward_transient(cfg: GPTConfig, b: int, tp: int) -> int:
    """At the log-softmax backward: the incoming NLL gradient and the logits gradient, both B*N*V/tp fp32."""
    return 2 * logits_bytes(cfg, b, tp)


# ---------------------------------------------------------------------------------------------------------------
# the estimate
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Estimate:
    layout: Layout
    settings: Settings
    stage: int                      # the heaviest pipeline stage
    components: dict[str, int]      # bytes at the peak moment; they sum to `total`
    moment: str                     # where the peak happens
    micro_batches: int              # per optimizer step, per rank
    in_flight: int                  # micro-batches whose activations the stage holds at once
    activations_per_micro_batch: int
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.components.values())

    def fits(self, gpu_mem_gib: float, headroom: float = DEFAULT_HEADROOM) -> bool:
        return self.total <= gpu_mem_gib * GiB * (1 - headroom)


def _stage_layers(cfg: GPTConfig, pp: int, stage: int) -> range:
    per = cfg.n_layer // pp
    return range(stage * per, (stage + 1) * per)


def estimate(cfg: GPTConfig, layout: Layout, settings: Settings) -> Estimate:
    """Peak memory of the heaviest pipeline stage of one rank for one optimizer step in steady state."""
    check_layout(cfg, layout, settings)
    best: Estimate | None = None
    for stage in range(layout.pp):
        est = _estimate_stage(cfg, layout, settings, stage)
        if best is None or est.total > best.total:
            best = est
    assert best is not None
    return best


def batch_and_buffer_bytes(cfg: GPTConfig, b: int, s: Settings) -> int:
    """The micro-batch itself (int64 codes, t2i caption features) and the model's buffers (RoPE table, t2i uncond
    caption)."""
    total = b * cfg.block_size * 8 + (cfg.seq_len + 1) * cfg.head_dim * 4
    if cfg.model_type == "t2i":
        total += b * cfg.cls_token_num * cfg.caption_dim * s.act_bytes + cfg.caption_len * cfg.caption_dim * 4
    else:
        total += b * 8
    return total


def _estimate_stage(cfg: GPTConfig, layout: Layout, s: Settings, stage: int) -> Estimate:
    tp, pp, dp, zero = layout.tp, layout.pp, layout.dp, layout.zero
    b = s.micro_batch
    first, last = stage == 0, stage == pp - 1
    layers = _stage_layers(cfg, pp, stage)

    # ---- model states -----------------------------------------------------------------------------------------
    lp = layer_params(cfg, tp)
    p_emb = embedding_params(cfg, tp) if first else 0
    p_head = head_params(cfg, tp) if last else 0
    P = len(layers) * lp + p_emb + p_head
    pb = s.act_bytes                           # bf16 params/grads in mixed precision, fp32 otherwise
    ob = 12 if s.precision == "bf16" else 8    # fp32 master + 2 moments, or 2 moments
    grad_shard = dp if zero >= 2 else 1
    params = P * pb // (dp if zero >= 3 else 1)
    grads_full = P * pb // grad_shard
    optim = P * ob // (dp if zero >= 1 else 1)
    buffers = 0
    if zero == 3 and dp > 1:
        unit = max(lp, p_emb, p_head)
        buffers = unit * (2 * pb + pb)         # gathered block + prefetched block + its full gradient
    elif dp > 1 and s.engine == "deepspeed":
        buffers = min(DS_BUCKET_ELEMS, P) * pb  # gradient reduce bucket
    batch = batch_and_buffer_bytes(cfg, b, s)

    # ---- activations -------------------------------------------------------------------------------------------
    micro_batches = max(1, s.global_batch // (b * dp))
    in_flight = min(pp - stage, micro_batches)
    a_full = layer_activation_bytes(cfg, b, tp, s)
    a_ckpt = checkpointed_layer_bytes(cfg, b, s)
    ckpt = [s.checkpointing > 0 and i % s.checkpointing == 0 for i in layers]
    a_layers = [a_ckpt if c else a_full for c in ckpt]
    a_emb = embedding_activation_bytes(cfg, b, s) if first else 0
    a_head = head_activation_bytes(cfg, b, tp, s) if last else 0
    # DeepSpeed's pipeline engine keeps each in-flight micro-batch's received input and sent output (b, S, d)
    a_pipe = 2 * b * cfg.seq_len * cfg.dim * s.act_bytes if pp > 1 else 0
    a_mb = a_emb + sum(a_layers) + a_head + a_pipe
    others = (in_flight - 1) * a_mb
    moments = block_backward_moments(cfg, b, tp, s)
    # gradients exist for the whole step with DeepSpeed buffers, or once a previous micro-batch has accumulated
    grads_persistent = s.engine == "deepspeed" or micro_batches > 1
    d, h = cfg.dim, cfg.ffn_hidden
    g_of = lambda n: n * pb // grad_shard  # noqa: E731  (gradient bytes of n local parameters)
    grads_at = {"SwiGLU backward": g_of(d * h // tp),                                   # w2 done
                "attention backward": g_of(3 * d * h // tp + d * d // tp + d)}          # FFN, wo, ffn_norm done

    points: list[tuple[str, dict[str, int]]] = []

    def point(moment: str, grads: int, acts: int, transient: int) -> None:
        points.append((moment, {"parameters": params, "gradients": grads, "optimizer states": optim,
                                "ZeRO buffers": buffers, "batch and buffers": batch, "activations": acts,
                                "transient": transient}))

    if last:
        point("cross-entropy backward (head)", grads_full if grads_persistent else 0, others + a_mb,
              head_backward_transient(cfg, b, tp))
    # backward of each block, top to bottom; the head's saved tensors are gone by then. A recomputed block first
    # rebuilds its full saved set.
    remaining = others + a_emb + sum(a_layers) + a_pipe
    grads_done = g_of(p_head)
    for j in reversed(range(len(layers))):
        acts = remaining + ((a_full - a_ckpt) if ckpt[j] else 0)
        for name, (released, extra) in moments.items():
            grads = grads_full if grads_persistent else grads_done + grads_at[name]
            point(f"{name} of block {layers[j]}", grads, acts - released, extra)
        grads_done += g_of(lp)
        remaining -= a_layers[j]
    # optimizer step
    if s.device == "gpu":
        shard = P // (dp if zero >= 1 else 1)
        t_opt = 4 * shard                                              # foreach: one fp32 temporary per element
        if s.precision == "bf16":
            t_opt += 4 * shard                                         # fp32 gradients of the optimizer shard
    else:
        # per-tensor AdamW: sqrt(v) and its quotient for this tensor while the previous tensor's denominator is
        # still bound to the loop variable
        sizes = stage_param_sizes(cfg, layout, stage)
        t_opt = 4 * max(2 * n + prev for prev, n in zip([0] + sizes[:-1], sizes))
        if s.precision == "bf16":
            t_opt += 4 * P                                             # fp32 gradients for the master weights
    point("optimizer step", grads_full, 0, t_opt)

    moment, comps = max(points, key=lambda p: sum(p[1].values()))
    notes = []
    if s.attention == "math":
        notes.append("math attention keeps the S x S probabilities per block")
    return Estimate(layout=layout, settings=s, stage=stage, components=comps, moment=moment,
                    micro_batches=micro_batches, in_flight=in_flight, activations_per_micro_batch=a_mb, notes=notes)


def stage_params(cfg: GPTConfig, layout: Layout, stage: int) -> int:
    """Parameters one TP rank of pipeline stage `stage` holds before ZeRO sharding."""
    P = len(_stage_layers(cfg, layout.pp, stage)) * layer_params(cfg, layout.tp)
    P += embedding_params(cfg, layout.tp) if stage == 0 else 0
    P += head_params(cfg, layout.tp) if stage == layout.pp - 1 else 0
    return P


def stage_param_sizes(cfg: GPTConfig, layout: Layout, stage: int) -> list[int]:
    """Element counts of the stage's parameter tensors on one TP rank, in the model's registration order."""
    tp, d, h = layout.tp, cfg.dim, cfg.ffn_hidden
    sizes: list[int] = []
    if stage == 0:
        if cfg.model_type == "c2i":
            sizes.append((cfg.num_classes + (1 if cfg.class_dropout_prob > 0 else 0)) * d)
        else:
            sizes += [cfg.caption_dim * d, d * d]
        sizes.append(cfg.vocab_size * d // tp)
    for _ in _stage_layers(cfg, layout.pp, stage):
        sizes += [3 * d * d // tp, d * d // tp, d * h // tp, d * h // tp, h * d // tp, d, d]
    if stage == layout.pp - 1:
        sizes += [d, cfg.vocab_size * d // tp]
    return sizes


def zero_model_states(cfg: GPTConfig, layout: Layout, precision: str = "bf16") -> dict[str, int]:
    """Bytes of parameters, gradients and AdamW states per rank on the heaviest stage (no activations):
    ZeRO-1 shards the optimizer states over dp, ZeRO-2 also the gradients, ZeRO-3 also the parameters."""
    pb = 2 if precision == "bf16" else 4
    ob = 12 if precision == "bf16" else 8
    P = max(stage_params(cfg, layout, st) for st in range(layout.pp))
    dp, z = layout.dp, layout.zero
    return {"parameters": P * pb // (dp if z >= 3 else 1), "gradients": P * pb // (dp if z >= 2 else 1),
            "optimizer states": P * ob // (dp if z >= 1 else 1)}


# ---------------------------------------------------------------------------------------------------------------
# suggestions
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Suggestion:
    estimate: Estimate
    score: float            # relative expected throughput (1.0 = ideal data parallel, no recompute)

    @property
    def layout(self) -> Layout:
        return self.estimate.layout


def throughput_score(cfg: GPTConfig, layout: Layout, s: Settings) -> float:
    """Heuristic relative throughput. Recompute costs a forward (1/3 of a step) per recomputed block; the 1F1B
    bubble costs (pp-1)/(m+pp-1); each doubling of tp costs ~8% (NVLink all-reduces, within a node); ZeRO-3
    gathers parameters every forward and backward (~7%); small GEMMs (micro-batch tokens x width / tp) use the GPU
    poorly: efficiency w / (w + 256 * 1024)."""
    n = s.checkpointing
    recomputed = 0.0 if n == 0 else math.ceil((cfg.n_layer // layout.pp) / n) / (cfg.n_layer // layout.pp)
    score = 1.0 / (1.0 + recomputed / 3.0)
    m = max(1, s.global_batch // (s.micro_batch * layout.dp))
    score *= 1.0 - (layout.pp - 1) / (m + layout.pp - 1)
    score /= 1.0 + 0.08 * math.log2(layout.tp)
    score *= {0: 1.0, 1: 1.0, 2: 0.99, 3: 0.93}[layout.zero]
    work = s.micro_batch * cfg.seq_len * cfg.dim / layout.tp       # GEMM rows x width per GPU
    score *= work / (work + 256 * 1024)
    return score


def _divides_model(cfg: GPTConfig, tp: int, pp: int) -> bool:
    try:
        check_layout_divisibility(cfg, tp, pp)
    except ValueError:
        return False
    return True


def suggest(cfg: GPTConfig, gpus: int, gpu_mem_gib: float = 80.0, base: Settings | None = None,
            headroom: float = DEFAULT_HEADROOM, gpus_per_node: int = 8,
            micro_batch: int | None = None) -> list[Suggestion]:
    """Layouts of `gpus` GPUs that fit, best expected throughput first. For each (tp, pp, zero, checkpointing) the
    largest power-of-two micro-batch that fits is taken (or the given one)."""
    base = base or Settings()
    out: list[Suggestion] = []
    tps = [t for t in (1, 2, 4, 8) if t <= gpus_per_node and gpus % t == 0 and _divides_model(cfg, t, 1)]
    for tp in tps:
        for pp in [p for p in range(1, cfg.n_layer + 1) if cfg.n_layer % p == 0 and gpus % (tp * p) == 0]:
            dp = gpus // (tp * pp)
            if base.global_batch % dp:
                continue
            per_rank = base.global_batch // dp
            mbs = [micro_batch] if micro_batch else [m for m in (2 ** i for i in range(12)) if m <= per_rank]
            mbs = [m for m in mbs if per_rank % m == 0]
            for zero in ((0, 1, 2, 3) if pp == 1 else (0, 1)):
                if dp == 1 and zero > 0:
                    continue  # nothing to shard over
                best_mb = 0
                for ck in (0, 2, 1):   # recompute only when it buys a larger micro-batch
                    fitted = None
                    for mb in sorted(mbs, reverse=True):
                        s = replace(base, micro_batch=mb, checkpointing=ck)
                        est = estimate(cfg, Layout(tp, pp, dp, zero), s)
                        if est.fits(gpu_mem_gib, headroom):
                            fitted = est
                            break
                    if fitted is not None and fitted.settings.micro_batch > best_mb:
                        best_mb = fitted.settings.micro_batch
                        out.append(Suggestion(fitted, throughput_score(cfg, fitted.layout, fitted.settings)))
    out.sort(key=lambda sg: (-sg.score, sg.estimate.total))
    return out


# ---------------------------------------------------------------------------------------------------------------
# measurement (CPU): live tensor bytes of one training step
# ---------------------------------------------------------------------------------------------------------------
def measure_training_step(cfg: GPTConfig, batch: int, checkpointing: int = 0, precision: str = "fp32",
                          warmup_steps: int = 1, seed: int = 0, device=None) -> dict:
    """Peak memory of a single-process training step (forward, loss, backward, AdamW step), after `warmup_steps`
    steps so the optimizer states exist.

    On CPU (the default) it counts live tensor bytes: every op output's storage is tracked with a TorchDispatchMode
    and freed through weak references, so the count is exact for tensors, including parameters, gradients and
    optimizer states. On an accelerator it reads the allocator's peak (argen.device.peak_memory_bytes). bf16 keeps
    fp32 master weights with the AdamW states, as DeepSpeed's bf16 optimizer does."""
    import torch
    import torch.utils.checkpoint as tuc

    from argen import device as dev
    from argen.model.gpt import GPT, gpt_loss

    device = torch.device(device or "cpu")
    on_accel = dev.is_accelerator(device)
    torch.manual_seed(seed)
    model = GPT(cfg).to(device)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    model.train()
    if checkpointing:
        blocks = list(model.layers)

        def run_layers(x, rope, mask, start_pos=None):
            for i, layer in enumerate(blocks):
                if i % checkpointing == 0:
                    x = tuc.checkpoint(layer, x, rope, mask, use_reentrant=False)
                else:
                    x = layer(x, rope, mask)
            return x
        model.run_layers = run_layers  # type: ignore[method-assign]
    params = list(model.parameters())
    # bf16: mixed precision as DeepSpeed does it, fp32 master weights hold the AdamW states
    masters = [torch.nn.Parameter(p.detach().float()) for p in params] if precision == "bf16" else params
    # CPU: per-tensor AdamW (the planner's device='cpu'); accelerators: torch's default foreach (device='gpu')
    opt = torch.optim.AdamW(masters, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                            foreach=None if on_accel else False)
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g).to(device)
    if cfg.model_type == "c2i":
        cond = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
        cond_mask = None
    else:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        cond = torch.randn(batch, cfg.cls_token_num, cfg.caption_dim, generator=g).to(device, dtype)
        cond_mask = torch.ones(batch, cfg.cls_token_num, dtype=torch.bool)
        cond_mask[:, : cfg.cls_token_num // 2] = False   # left-padded captions
        cond_mask = cond_mask.to(device)

    tracker = LiveTensorBytes()

    def step():
        tracker.phase = "forward"
        loss = gpt_loss(model(codes, cond, cond_mask), codes)
        tracker.phase = "backward"
        loss.backward()
        tracker.phase = "optimizer step"
        if masters is not params:
            for m, p in zip(masters, params):
                m.grad = p.grad.float()
        opt.step()
        if masters is not params:
            with torch.no_grad():
                for m, p in zip(masters, params):
                    p.copy_(m)
                    m.grad = None
        opt.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(warmup_steps):
        step()
    if on_accel:
        dev.synchronize(device)
        dev.reset_peak_memory(device)
        loss = step()
        dev.synchronize(device)
        return {"peak": dev.peak_memory_bytes(device), "base": None, "phase": None, "loss": loss,
                "params": sum(p.numel() for p in model.parameters())}
    with tracker:
        tracker.track_many(params + list(model.buffers()) + [codes, cond])
        if masters is not params:
            tracker.track_many(masters)
        tracker.track_many([v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)])
        base = tracker.live
        loss = step()
    return {"peak": tracker.peak, "base": base, "phase": tracker.peak_phase, "loss": loss,
            "params": sum(p.numel() for p in model.parameters())}


class LiveTensorBytes:
    """Counts the bytes of live tensor storages: each op output's storage is added once and subtracted when the
    storage is freed (weakref finalizer on the preserved UntypedStorage object). Usable as a context manager."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._outputs(out)
                return out

        self._mode = _Mode()
        self.live = 0
        self.peak = 0
        self.phase = ""
        self.peak_phase = ""
        self._sizes: dict[int, int] = {}

    def _outputs(self, out) -> None:
        from torch.utils._pytree import tree_flatten
        for t in tree_flatten(out)[0]:
            self.track(t)

    def track(self, t) -> None:
        import weakref

        import torch
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._sizes:
            return
        n = st.nbytes()
        self._sizes[key] = n
        self.live += n
        weakref.finalize(st, self._free, key)
        if self.live > self.peak:
            self.peak, self.peak_phase = self.live, self.phase

    def track_many(self, tensors) -> None:
        for t in tensors:
            self.track(t)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)
