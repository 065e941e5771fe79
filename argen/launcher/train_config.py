"""The typed config tree of `argen train` for GPT models (`kind: gpt`).

A recipe is a YAML file with the sections below plus dotted overrides on the command line:

    argen train configs/gpt-b.yaml parallel.tp=2 train.max_steps=1000 run_dir=runs/b

Defaults follow the LlamaGen reference recipe (`autoregressive/train/train_c2i.py`): AdamW betas (0.9, 0.95),
weight decay 0.05 on every parameter with two or more dimensions (matrices and embedding tables; none on the 1-D
RMSNorm weights), lr 1e-4 constant, grad clip 1.0, bf16 mixed precision, global batch 256, dropout 0.1 on tokens/residual/FFN and class dropout
0.1. Impossible combinations fail at load with a ConfigError that names the key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from argen.model.gpt import GPT_SIZES, GPTConfig, gpt_config
from argen.parallel.topology import check_layout_divisibility


@dataclass
class ModelSection:
    name: str = "GPT-B"                  # a GPT_SIZES name (argen models lists them)
    model_type: Literal["c2i", "t2i"] = "c2i"
    image_size: int = 256                # pixels; the token grid is image_size / downsample
    downsample: int = 16
    vocab_size: int = 16384
    num_classes: int = 1000
    caption_dim: int = 2048
    dropout: float = 0.1                 # residual and FFN dropout (reference --dropout-p)
    token_dropout: float = 0.1
    class_dropout: float = 0.1
    drop_path: float = 0.0
    rope_prefix: Literal["reference", "identity"] = "identity"
    # size overrides for tiny test models (0 = take them from `name`)
    n_layer: int = 0
    n_head: int = 0
    dim: int = 0
    # fine-tuning: an export dir (config.json + model.safetensors) or a checkpoint dir to take the weights from.
    # Only weights are taken (fresh optimizer, step 0); RoPE depends only on block_size, so 256 -> 512 px works.
    init_from: str = ""

    def validate(self) -> None:
        if self.name not in GPT_SIZES:
            raise ValueError(f"name: unknown model '{self.name}' (known: {', '.join(GPT_SIZES)})")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} is not divisible by downsample {self.downsample}")
        try:
            self.gpt_config().validate()
        except ValueError as e:
            raise ValueError(str(e)) from None

    def gpt_config(self) -> GPTConfig:
        over = {}
        if self.n_layer:
            over["n_layer"] = self.n_layer
        if self.n_head:
            over["n_head"] = self.n_head
        if self.dim:
            over["dim"] = self.dim
        return gpt_config(self.name, self.image_size, self.model_type, self.downsample,
                          vocab_size=self.vocab_size, num_classes=self.num_classes, caption_dim=self.caption_dim,
                          resid_dropout_p=self.dropout, ffn_dropout_p=self.dropout,
                          token_dropout_p=self.token_dropout, class_dropout_prob=self.class_dropout,
                          drop_path_rate=self.drop_path, rope_prefix=self.rope_prefix, **over)


@dataclass
class DataSection:
    # 'synthetic': an in-memory code source with learnable structure (tests, benchmarks, demos without shards);
    # 'shards': the streaming loader over `url` (file://, a local path or s3://). 'auto' = shards when url is set.
    source: Literal["auto", "synthetic", "shards"] = "auto"
    url: str = ""
    synthetic_samples: int = 4096        # size of the synthetic data set (it repeats in epochs)
    options: dict = field(default_factory=dict)  # extra DataConfig fields of the streaming loader

    def resolved_source(self) -> str:
        if self.source == "auto":
            return "shards" if self.url else "synthetic"
        return self.source

    def validate(self) -> None:
        if self.source == "shards" and not self.url:
            raise ValueError("url: data.source=shards needs data.url")
        if self.synthetic_samples < 1:
            raise ValueError("synthetic_samples must be >= 1")


@dataclass
class ParallelSection:
    tp: int = 1                          # tensor parallel (megatron-core layers)
    pp: int = 1                          # pipeline stages (DeepSpeed PipelineModule)
    dp: int = 0                          # data parallel; 0 = world_size / (tp * pp)
    zero: Literal[0, 1, 2, 3] = 0        # DeepSpeed ZeRO stage (pp > 1 allows 0 or 1)
    activation_checkpointing: Literal["off", "every_block", "every_n"] = "off"
    checkpoint_every_n: int = 2          # with every_n: recompute blocks 0, n, 2n, ...
    # the single-process path (tp = pp = dp = 1) uses a plain PyTorch loop; 'deepspeed' forces the engine anyway
    single_process_engine: Literal["torch", "deepspeed"] = "torch"

    def validate(self) -> None:
        for k in ("tp", "pp"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.dp < 0:
            raise ValueError(f"dp must be >= 0, got {self.dp}")
        if self.pp > 1 and self.zero > 1:
            raise ValueError(f"zero: ZeRO-{self.zero} cannot be combined with pipeline parallelism (pp={self.pp}); use 0 or 1")
        if self.checkpoint_every_n < 1:
            raise ValueError("checkpoint_every_n must be >= 1")


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05           # on parameters with ndim >= 2 (as the reference); 0 on norms
    grad_clip: float = 1.0               # 0 = off
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1            # cosine/linear floor as a fraction of lr
    ema: bool = False
    ema_decay: float = 0.9999

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        if not 0 < self.ema_decay < 1:
            raise ValueError("ema_decay must be in (0, 1)")


@dataclass
class TrainSection:
    global_batch: int = 256              # samples per optimizer step (all ranks, all micro-batches)
    micro_batch: int = 0                 # per rank per forward; 0 = global_batch / dp (no accumulation)
    max_steps: int = 1000
    precision: Literal["bf16", "fp32"] = "bf16"
    seed: int = 0
    checkpoint_every: int = 5000         # steps; 0 = only at the end and on preemption
    keep_checkpoints: int = 3            # newest N kept (0 = keep all)
    export_every: int = 0                # consolidated export every N steps (0 = with each checkpoint)
    # the layout-free copy (fp32 weights + AdamW moments per stage/TP rank) that makes re-sharding resumes and
    # exports possible; at multi-billion scale its writer rank holds its shard's fp32 state in host memory while
    # saving. Off: DeepSpeed's own files only (same-layout resume), no exports from the engine path.
    universal_checkpoint: bool = True
    resume: str = "auto"                 # auto | none | a checkpoint directory
    compile: bool = False                # torch.compile each block (every layout, on every rank)

    def validate(self) -> None:
        if self.global_batch < 1 or self.max_steps < 0 or self.micro_batch < 0:
            raise ValueError("global_batch >= 1, micro_batch >= 0 and max_steps >= 0 are required")
        if self.checkpoint_every < 0 or self.export_every < 0 or self.keep_checkpoints < 0:
            raise ValueError("checkpoint_every, export_every and keep_checkpoints must be >= 0")


@dataclass
class LogSection:
    every: int = 10                      # steps between metric lines
    wandb: Literal["auto", "online", "offline", "off"] = "auto"  # auto: online with credentials, else offline
    project: str = "argen"
    name: str = ""

    def validate(self) -> None:
        if self.every < 1:
            raise ValueError("every must be >= 1")


@dataclass
class TrainConfig:
    kind: str = "gpt"
    run_dir: str = "runs/gpt"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    log: LogSection = field(default_factory=LogSection)

    def validate(self) -> None:
        if self.kind != "gpt":
            raise ValueError(f"kind: this loop trains 'gpt' models, got '{self.kind}'")
        gcfg = self.model.gpt_config()
        check_layout_divisibility(gcfg, self.parallel.tp, self.parallel.pp)
        if self.optim.ema and self.parallel.zero == 3:
            raise ValueError("optim.ema: EMA is kept on local (non-ZeRO-3) parameters; use zero <= 2")
