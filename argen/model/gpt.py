"""The Llama-style GPT for class- and text-conditional image-token generation (LlamaGen `autoregressive/models/gpt.py`).

Plain PyTorch, no distributed code: argen/parallel swaps in tensor-parallel layers and pipeline stages.
Sequence layout: [prefix (cls_token_num condition embeddings); image tokens 0..N-2]; the prefix's last position
predicts image token 0 and image position k-1 predicts token k, so `model(codes, cond)` returns (B, N, V) logits
with logits[:, k] predicting codes[:, k].
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from argen.errors import ArgenError
from argen.model.attention import attention


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class GPTConfig:
    name: str = "custom"
    vocab_size: int = 16384
    n_layer: int = 12
    n_head: int = 12
    dim: int = 768
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    model_type: Literal["c2i", "t2i"] = "c2i"
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    caption_dim: int = 2048
    caption_len: int = 120  # rows of the stored uncond caption; also the t2i prefix length
    cls_token_num: int = 1
    block_size: int = 256  # image tokens per sample (grid * grid)
    # 'reference': prefix rows of the RoPE cache are zero (q, k vanish there), needed for LlamaGen weights.
    # 'identity': prefix positions are not rotated, so image tokens can attend to the condition by content.
    rope_prefix: Literal["reference", "identity"] = "identity"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def ffn_hidden(self) -> int:
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return find_multiple(hidden, self.multiple_of)

    @property
    def grid(self) -> int:
        return math.isqrt(self.block_size)

    @property
    def seq_len(self) -> int:
        """Training sequence length: prefix plus all image tokens but the last."""
        return self.cls_token_num + self.block_size - 1

    def validate(self) -> None:
        if self.dim % self.n_head:
            raise ValueError(f"dim {self.dim} is not divisible by n_head {self.n_head}")
        if self.head_dim % 4:
            raise ValueError(f"head_dim {self.head_dim} must be a multiple of 4 for 2D RoPE (row and column halves of pairs)")
        if self.grid * self.grid != self.block_size:
            raise ValueError(f"block_size {self.block_size} is not a square grid of image tokens")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        if self.model_type == "c2i" and self.cls_token_num < 1:
            raise ValueError("cls_token_num must be >= 1")
        if self.model_type == "t2i" and self.cls_token_num != self.caption_len:
            raise ValueError(f"t2i needs cls_token_num == caption_len ({self.caption_len}), got {self.cls_token_num}")
        for name in ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate",
                     "class_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")


# name -> (n_layer, n_head, dim); LlamaGen's GPT_models table
GPT_SIZES: dict[str, tuple[int, int, int]] = {
    "GPT-tiny": (2, 4, 128),
    "GPT-small": (6, 8, 384),
    "GPT-B": (12, 12, 768),
    "GPT-L": (24, 16, 1024),
    "GPT-XL": (36, 20, 1280),
    "GPT-XXL": (48, 24, 1536),
    "GPT-XXXL": (48, 40, 2560),
    "GPT-1B": (22, 32, 2048),
    "GPT-3B": (24, 32, 3200),
    "GPT-7B": (32, 32, 4096),
}


def gpt_config(name: str, image_size: int = 256, model_type: str = "c2i", downsample: int = 16, **overrides) -> GPTConfig:
    """The named size at an image resolution (256/384/512 px -> 16/24/32 grid with 16x downsampling)."""
    name = {k.lower(): k for k in GPT_SIZES}.get(name.lower(), name)
    if name not in GPT_SIZES:
        import difflib
        close = difflib.get_close_matches(name, list(GPT_SIZES), n=1)
        raise ArgenError(f"unknown model '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
                         + f"; known: {', '.join(GPT_SIZES)}")
    n_layer, n_head, dim = GPT_SIZES[name]
    if image_size % downsample:
        raise ArgenError(f"image_size {image_size} is not divisible by the tokenizer's downsampling {downsample}")
    grid = image_size // downsample
    t2i = model_type == "t2i"
    cfg = GPTConfig(name=name, n_layer=n_layer, n_head=n_head, dim=dim, model_type=model_type,  # type: ignore[arg-type]
                    block_size=grid * grid,
                    cls_token_num=overrides.get("caption_len", GPTConfig.caption_len) if t2i else 1)
    cfg = replace(cfg, **overrides)
    cfg.validate()
    return cfg


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_2d_cache(grid: int, head_dim: int, base: float, prefix_len: int, prefix: str) -> torch.Tensor:
    """(prefix_len + grid², head_dim/2, 2) table of (cos, sin); pair m < head_dim/4 rotates by row, the rest by column."""
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    f = torch.outer(torch.arange(grid, dtype=torch.float32), freqs)  # (grid, head_dim/4)
    angles = torch.cat([f[:, None, :].expand(-1, grid, -1), f[None, :, :].expand(grid, -1, -1)], dim=-1)
    cache = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1).flatten(0, 1)
    pre = torch.zeros(prefix_len, half, 2)
    if prefix == "identity":
        pre[..., 0] = 1.0
    return torch.cat([pre, cache])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x: (B, S, H, D); rope: (S, D/2, 2), or (B, S, D/2, 2) for per-row positions (the serving engine).
    Interleaved pairs (2m, 2m+1), computed in fp32."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    r = rope.unsqueeze(-3)  # broadcast over heads
    out = torch.stack([xs[..., 0] * r[..., 0] - xs[..., 1] * r[..., 1],
                       xs[..., 1] * r[..., 0] + xs[..., 0] * r[..., 1]], dim=-1)
    return out.flatten(3).type_as(x)


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class KVCache(nn.Module):
    """Per-layer key/value buffers (B, H, S_max, D) written in place at absolute positions."""

    def __init__(self, batch: int, n_head: int, max_seq: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = cfg.n_head, cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.attn_dropout_p = cfg.attn_dropout_p
        self.resid_dropout = nn.Dropout(cfg.resid_dropout_p)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None, start_pos: int | None = None) -> torch.Tensor:
        B, S, _ = x.shape
        q, k, v = self.wqkv(x).view(B, S, 3, self.n_head, self.head_dim).unbind(2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        causal = mask is None
        if start_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
            causal = causal and S > 1  # a single new query may see every cached key
        y = attention(q, k, v, mask=mask, is_causal=causal,
                      dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, S, -1)))


class FeedForward(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        hidden = cfg.ffn_hidden
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)
        self.ffn_dropout = nn.Dropout(cfg.ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: GPTConfig, drop_path: float):
        super().__init__()
        self.attention = Attention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, rope, mask, start_pos=None):
        h = x + self.drop_path(self.attention(self.attention_norm(x), rope, mask, start_pos))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


class LabelEmbedder(nn.Module):
    """Class table with a null class `num_classes`; labels are dropped to it with class_dropout_prob in training."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes, self.dropout_prob = num_classes, dropout_prob
        self.embedding_table = nn.Embedding(num_classes + (1 if dropout_prob > 0 else 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels).unsqueeze(1)


class CaptionMLP(nn.Module):
    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """T5 caption features -> prefix embeddings; whole captions drop to a stored (untrained) uncond caption."""

    def __init__(self, caption_dim: int, dim: int, caption_len: int, dropout_prob: float):
        super().__init__()
        self.dropout_prob = dropout_prob
        self.cap_proj = CaptionMLP(caption_dim, dim)
        self.register_buffer("uncond_embedding", torch.randn(caption_len, caption_dim) / caption_dim ** 0.5)

    def forward(self, captions: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(captions.shape[0], device=captions.device) < self.dropout_prob
            captions = torch.where(drop[:, None, None], self.uncond_embedding.to(captions.dtype), captions)
        return self.cap_proj(captions)


class GPT(nn.Module):
    kind = "gpt"

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        if cfg.model_type == "c2i":
            self.cls_embedding: nn.Module = LabelEmbedder(cfg.num_classes, cfg.dim, cfg.class_dropout_prob)
        else:
            self.cls_embedding = CaptionEmbedder(cfg.caption_dim, cfg.dim, cfg.caption_len, cfg.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.tok_dropout = nn.Dropout(cfg.token_dropout_p)
        rates = [cfg.drop_path_rate * i / max(cfg.n_layer - 1, 1) for i in range(cfg.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(cfg, r) for r in rates)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_2d_cache(cfg.grid, cfg.head_dim, cfg.rope_base, cfg.cls_token_num,
                                                   cfg.rope_prefix), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)  # initial logits 0, initial loss ln V

    # ---- pieces shared by training and generation -------------------------------------------------------------
    def null_condition(self, batch: int, device) -> torch.Tensor:
        """The unconditional prefix input for CFG: the null class, or the stored uncond caption."""
        if self.config.model_type == "c2i":
            return torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
        return self.cls_embedding.uncond_embedding.unsqueeze(0).expand(batch, -1, -1)

    def embed_condition(self, cond: torch.Tensor) -> torch.Tensor:
        return self.cls_embedding(cond)[:, : self.config.cls_token_num]

    @staticmethod
    def prefix_mask(cond_mask: torch.Tensor | None, seq_len: int) -> torch.Tensor | None:
        """(B,1,S,S) bool: causal, padded caption keys hidden, every row sees itself (no empty softmax rows)."""
        if cond_mask is None:
            return None
        B, T = cond_mask.shape
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=cond_mask.device).tril()
        keys = torch.ones(B, seq_len, dtype=torch.bool, device=cond_mask.device)
        keys[:, :T] = cond_mask.bool()
        mask = causal[None] & keys[:, None, :]
        mask |= torch.eye(seq_len, dtype=torch.bool, device=cond_mask.device)[None]
        return mask[:, None]

    def run_layers(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None, start_pos: int | None = None):
        for layer in self.layers:
            x = layer(x, rope, mask, start_pos)
        return x

    def forward(self, codes: torch.Tensor, cond: torch.Tensor, cond_mask: torch.Tensor | None = None) -> torch.Tensor:
        """codes (B, N) long, cond labels (B,) or caption features (B, T, D) -> logits (B, N, V) float32."""
        T = self.config.cls_token_num
        x = torch.cat([self.embed_condition(cond), self.tok_embeddings(codes[:, :-1])], dim=1)
        x = self.tok_dropout(x)
        S = x.shape[1]
        x = self.run_layers(x, self.rope[:S], self.prefix_mask(cond_mask, S))
        # only positions T-1.. predict image tokens: skip the head on the rest of the prefix
        return self.output(self.norm(x[:, T - 1:])).float()

    # ---- KV-cached decoding (argen.generate; argen.serve keeps its own static cache) -------------------------
    def setup_kv_cache(self, batch: int, max_seq: int, dtype=None, device=None) -> None:
        p = self.output.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, self.config.n_head, max_seq, self.config.head_dim,
                                               dtype or p.dtype, device or p.device)

    def clear_kv_cache(self) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = None

    def hidden_cached(self, x: torch.Tensor, start_pos: int, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Embeddings x (B, S, dim) at absolute positions start_pos..start_pos+S-1 -> last position's normed hidden
        state (B, dim), the input of the output head."""
        S = x.shape[1]
        h = self.run_layers(x, self.rope[start_pos:start_pos + S], mask, start_pos)
        return self.norm(h[:, -1])


def gpt_loss(logits: torch.Tensor, codes: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over all B*N tokens; with `valid` (B,) 0/1 per sample, over valid samples only."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), codes.reshape(-1), reduction="none")
    if valid is None:
        return ce.mean()
    w = valid.to(ce.dtype).repeat_interleave(codes.shape[1])
    return (ce * w).sum() / w.sum().clamp(min=1.0)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the stored uncond caption is a buffer and does not count)."""
    return sum(p.numel() for p in model.parameters())
