"""The VQ image tokenizer (LlamaGen's VQ-16 / VQ-8): CNN encoder -> L2-normalised codebook -> CNN decoder.

    vq = VQModel(VQ_SIZES["VQ-16"])
    codes = vq.encode(images)          # images in [-1, 1], (B, 3, H, W) -> (B, H/16, W/16) int64
    images = vq.decode(codes)          # (B, h, w) or row-major (B, h*w) -> (B, 3, H, W), nominally [-1, 1]

The module tree and parameter names mirror the reference implementation exactly (so a LlamaGen checkpoint
converts with a strict 1:1 key map) and the parameter counts equal the reference's: VQ-16 71,883,403,
VQ-8 70,109,835. Deliberate deviations, all invisible to the weights:
- the usage FIFO `quantize.codebook_used` starts filled with -1 (the reference's zeros count code 0 as used until
  65,536 assignments have passed) and a batch larger than the FIFO keeps its newest indices instead of failing;
- attention uses `scaled_dot_product_attention` (same maths: one head, scale C^-0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from argen.errors import ArgenError


@dataclass
class VQConfig:
    name: str = "VQ-16"
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    usage_buffer_len: int = 65536
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    ch: int = 128
    num_res_blocks: int = 2
    z_channels: int = 256
    norm_groups: int = 32
    dropout_p: float = 0.0
    image_size: int = 256  # nominal training resolution; the model itself is fully convolutional

    def validate(self) -> None:
        if self.codebook_size < 2 or self.codebook_embed_dim < 1:
            raise ValueError("codebook_size must be >= 2 and codebook_embed_dim >= 1")
        if len(self.encoder_ch_mult) != len(self.decoder_ch_mult):
            raise ValueError("encoder_ch_mult and decoder_ch_mult must have the same number of levels "
                             "(the downsample factor must equal the upsample factor)")
        for m in tuple(self.encoder_ch_mult) + tuple(self.decoder_ch_mult):
            if (self.ch * m) % self.norm_groups:
                raise ValueError(f"channels ch*mult = {self.ch * m} not divisible by norm_groups={self.norm_groups}")
        if self.z_channels % self.norm_groups:
            raise ValueError(f"z_channels={self.z_channels} not divisible by norm_groups={self.norm_groups}")
        if self.image_size % self.downsample:
            raise ValueError(f"image_size={self.image_size} is not a multiple of the downsample factor {self.downsample}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.encoder_ch_mult) - 1)


VQ_SIZES: dict[str, VQConfig] = {
    "VQ-16": VQConfig(name="VQ-16", encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4)),
    "VQ-8": VQConfig(name="VQ-8", encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4)),
    # Tiny models for tests and the CPU demo (64-px synthetic images -> 8x8 codes).
    "VQ-tiny": VQConfig(name="VQ-tiny", codebook_size=1024, ch=16, encoder_ch_mult=(1, 2, 2, 4),
                        decoder_ch_mult=(1, 2, 2, 4), num_res_blocks=1, z_channels=64, norm_groups=8,
                        image_size=64),
    "VQ-micro": VQConfig(name="VQ-micro", codebook_size=256, ch=8, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
                         num_res_blocks=1, z_channels=16, norm_groups=4, usage_buffer_len=1024, image_size=16),
}


def vq_config(name: str, **overrides) -> VQConfig:
    """A named VQ size with field overrides; unknown names raise ArgenError listing the known ones."""
    if name not in VQ_SIZES:
        raise ArgenError(f"unknown VQ model '{name}' (known: {', '.join(VQ_SIZES)})")
    base = VQ_SIZES[name]
    fields = {k: getattr(base, k) for k in base.__dataclass_fields__}
    fields.update(overrides)
    cfg = VQConfig(**fields)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# building blocks (names match the reference's state_dict keys)


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(2, 3) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale = c ** -0.5, as in the reference
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad right/bottom, as the reference


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nearest upsampling in fp32: bf16 interpolate is slow or unsupported on some backends
        return self.conv(F.interpolate(x.float(), scale_factor=2.0, mode="nearest").to(x.dtype))


class _Level(nn.Module):
    """One resolution level: `res` (ResnetBlocks), `attn` (AttnBlocks, maybe empty), optional down/upsample."""

    def __init__(self):
        super().__init__()
        self.res = nn.ModuleList()
        self.attn = nn.ModuleList()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, res in enumerate(self.res):
            h = res(h)
            if len(self.attn):
                h = self.attn[i](h)
        for name in ("downsample", "upsample"):
            if hasattr(self, name):
                h = getattr(self, name)(h)
        return h


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g, n = cfg.ch, cfg.encoder_ch_mult, cfg.norm_groups, len(cfg.encoder_ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1,) + tuple(mult)
        self.conv_blocks = nn.ModuleList()
        block_in = ch
        for lvl in range(n):
            level = _Level()
            block_in, block_out = ch * in_mult[lvl], ch * mult[lvl]
            for _ in range(cfg.num_res_blocks):
                level.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p, g))
                block_in = block_out
                if lvl == n - 1:
                    level.attn.append(AttnBlock(block_in, g))
            if lvl != n - 1:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout_p, g), AttnBlock(block_in, g),
                                  ResnetBlock(block_in, block_in, cfg.dropout_p, g)])
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        ch, mult, g, n = cfg.ch, cfg.decoder_ch_mult, cfg.norm_groups, len(cfg.decoder_ch_mult)
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, 1, 1)
        self.mid = nn.ModuleList([ResnetBlock(block_in, block_in, cfg.dropout_p, g), AttnBlock(block_in, g),
                                  ResnetBlock(block_in, block_in, cfg.dropout_p, g)])
        self.conv_blocks = nn.ModuleList()
        for lvl in range(n):  # level 0 is the lowest resolution
            level = _Level()
            block_out = ch * mult[n - lvl - 1]
            for _ in range(cfg.num_res_blocks + 1):
                level.res.append(ResnetBlock(block_in, block_out, cfg.dropout_p, g))
                block_in = block_out
                if lvl == 0:
                    level.attn.append(AttnBlock(block_in, g))
            if lvl != n - 1:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# quantizer


class QuantOut(NamedTuple):
    z_q: torch.Tensor            # (B, D, h, w) quantised latents with the straight-through gradient
    indices: torch.Tensor        # (B, h, w) int64
    vq_loss: torch.Tensor        # codebook loss (weight 1)
    commit_loss: torch.Tensor    # beta * commitment loss
    entropy_loss: torch.Tensor   # entropy_loss_ratio * (sample entropy - batch entropy)
    usage: float | None          # fraction of codes in the usage FIFO (training mode only)


def _entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    flat = affinity.reshape(-1, affinity.shape[-1]).float() / temperature
    probs = F.softmax(flat, dim=-1)
    log_probs = F.log_softmax(flat + 1e-5, dim=-1)
    avg = probs.mean(0)
    avg_entropy = -(avg * torch.log(avg + 1e-5)).sum()
    sample_entropy = -(probs * log_probs).sum(-1).mean()
    return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.n_e, self.e_dim = cfg.codebook_size, cfg.codebook_embed_dim
        self.beta, self.entropy_ratio, self.l2_norm = cfg.commit_loss_beta, cfg.entropy_loss_ratio, cfg.codebook_l2_norm
        self.show_usage = cfg.codebook_show_usage
        self.embedding = nn.Embedding(self.n_e, self.e_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / self.n_e, 1.0 / self.n_e)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, p=2, dim=-1))
        if self.show_usage:
            # float like the reference's buffer (1:1 conversion); -1 marks an empty slot
            self.register_buffer("codebook_used", torch.full((cfg.usage_buffer_len,), -1.0))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    # rows per block of the score matrix: 4096 x 16384 fp32 = 256 MiB, whatever the batch (512 crops of VQ-16
    # at 256 px are 131k rows: 8.6 GB per full distance matrix, and the reference's expression makes several)
    LOOKUP_ROWS = 4096

    def lookup(self, flat: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """Nearest-code indices for (N, D) latents (already normalised if l2_norm), in fp32.

        argmin |z - e|^2 = argmax (z.e - |e|^2 / 2): |z|^2 is the same for every code, so one fused addmm per
        block of rows replaces the reference's four passes over an N x K matrix (1.4x on CPU). The two forms
        round differently only where two codes are within float error of each other."""
        # fp32 under autocast too: autocast would run the addmm in bf16, where near codes tie and flip
        with torch.autocast(flat.device.type, enabled=False):
            emb = self.codebook().float() if emb is None else emb.float()
            flat = flat.float()
            half_sq = emb.pow(2).sum(1).mul_(-0.5)
            emb_t = emb.t()
            out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
            for i in range(0, flat.shape[0], self.LOOKUP_ROWS):
                out[i: i + self.LOOKUP_ROWS] = torch.addmm(half_sq, flat[i: i + self.LOOKUP_ROWS], emb_t).argmax(1)
        return out

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor) -> float:
        buf = self.codebook_used
        size = buf.numel()
        idx = indices.reshape(-1)[-size:].to(buf.dtype)
        n = idx.numel()
        if n < size:
            buf[: size - n] = buf[n:].clone()
        buf[size - n:] = idx
        return float(torch.unique(buf[buf >= 0]).numel()) / self.n_e

    def forward(self, z: torch.Tensor) -> QuantOut:
        b, d, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()
        # the distance maths runs in fp32 even under autocast: 16384-way argmin in bf16 ties and flips codes
        z32 = z.float()
        if self.l2_norm:
            z32 = F.normalize(z32, p=2, dim=-1)
        emb = self.codebook().float()
        flat = z32.reshape(-1, d)
        scores = None
        if self.training and self.entropy_ratio > 0:
            # the entropy loss needs the whole (N, K) score matrix with its gradient; the codes come from it too
            with torch.autocast(flat.device.type, enabled=False):
                scores = torch.addmm(emb.pow(2).sum(1).mul(-0.5), flat, emb.t())  # z.e - |e|^2/2
            idx = scores.detach().argmax(1)
        else:
            with torch.no_grad():
                idx = self.lookup(flat, emb)
        z_q = emb[idx].view(z32.shape)
        zero = z32.new_zeros(())
        vq_loss = commit = ent = zero
        usage = None
        if self.training:
            vq_loss = torch.mean((z_q - z32.detach()) ** 2)
            commit = self.beta * torch.mean((z_q.detach() - z32) ** 2)
            if scores is not None:
                # -|z - e|^2 = 2 * scores - |z|^2, and a per-row constant leaves the softmaxes unchanged
                ent = self.entropy_ratio * _entropy_loss(2 * scores)
            if self.show_usage:
                usage = self.record_usage(idx)
        z_q = z32 + (z_q - z32).detach()  # straight-through estimator
        z_q = z_q.permute(0, 3, 1, 2).contiguous().to(z.dtype)
        return QuantOut(z_q, idx.view(b, h, w), vq_loss, commit, ent, usage)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, h, w) indices -> (B, D, h, w) normalised code vectors."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# the model


class VQModel(nn.Module):
    kind = "vq"

    def __init__(self, config: VQConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def code_dim(self) -> int:
        return self.config.codebook_embed_dim

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ArgenError(f"VQ expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
        f = self.downsample
        if images.shape[2] % f or images.shape[3] % f:
            raise ArgenError(f"image size {tuple(images.shape[2:])} is not a multiple of the downsample factor {f}")

    def quantize_images(self, images: torch.Tensor) -> QuantOut:
        self._check_images(images)
        return self.quantize(self.quant_conv(self.encoder(images)))

    def decode_latents(self, z_q: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, QuantOut]:
        """Training/eval pass: (reconstruction, QuantOut with the losses and indices)."""
        q = self.quantize_images(images)
        return self.decode_latents(q.z_q), q

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, 3, H, W) -> codes (B, H/f, W/f) int64 in [0, codebook_size)."""
        h = self.quant_conv(self.encoder(self._checked(images)))
        b, d, hh, ww = h.shape
        flat = h.permute(0, 2, 3, 1).reshape(-1, d).float()
        if self.config.codebook_l2_norm:
            flat = F.normalize(flat, p=2, dim=-1)
        return self.quantize.lookup(flat).view(b, hh, ww)

    def _checked(self, images: torch.Tensor) -> torch.Tensor:
        self._check_images(images)
        return images

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, shape: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (B, h, w), or row-major (B, h*w) with a square grid unless `shape` = (h, w) -> images (B, 3, H, W)."""
        if codes.ndim == 2:
            n = codes.shape[1]
            if shape is None:
                side = math.isqrt(n)
                if side * side != n:
                    raise ArgenError(f"cannot infer the code grid of {n} tokens; pass shape=(h, w)")
                shape = (side, side)
            if shape[0] * shape[1] != n:
                raise ArgenError(f"shape {shape} does not hold {n} codes")
            codes = codes.reshape(codes.shape[0], *shape)
        if codes.ndim != 3:
            raise ArgenError(f"codes must be (B, h, w) or (B, h*w), got {tuple(codes.shape)}")
        codes = codes.long()
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ArgenError(f"codes out of range [0, {self.codebook_size}): min {int(codes.min())}, "
                             f"max {int(codes.max())}")
        z_q = self.quantize.get_codebook_entry(codes)
        z_q = z_q.to(self.post_quant_conv.weight.dtype)
        return self.decode_latents(z_q)


def count_parameters(cfg: VQConfig) -> int:
    """Exact parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        model = VQModel(cfg)
    return sum(p.numel() for p in model.parameters())
