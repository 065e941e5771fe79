"""The VQ-GAN objective: reconstruction + LPIPS + quantizer losses + a PatchGAN adversarial term from `disc_start`.

Generator loss = rw·rec + pw·LPIPS + cw·(vq + commit + entropy) + [it ≥ disc_start]·disc_weight·a·G(D(x̂))
Discriminator loss = [it ≥ disc_start]·disc_weight·D_loss(D(x), D(x̂)),  with `it` the 1-based iteration number
(the reference passes train_steps + 1, so its GAN switches on at iteration 20,000) and `a` the adaptive weight
(1 unless enabled). Deviations from the reference, on purpose: "non-saturating" losses are BCE with the correct
argument order; LPIPS stays in eval mode; the generator pass does not leave gradients in the discriminator;
`codebook_weight` is applied (the reference parses it and ignores it; 1.0 reproduces it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from argen.model.discriminator import PatchGANDiscriminator


@dataclass
class VQLossConfig:
    reconstruction: Literal["l2", "l1"] = "l2"
    reconstruction_weight: float = 1.0
    perceptual_weight: float = 1.0
    lpips_dir: str = ""              # directory with vgg16-397923af.pth and vgg.pth (see argen.model.lpips)
    codebook_weight: float = 1.0
    disc_start: int = 20000
    disc_weight: float = 0.5
    disc_adaptive_weight: bool = False
    gen_loss: Literal["hinge", "non-saturating"] = "hinge"
    disc_loss: Literal["hinge", "vanilla", "non-saturating"] = "hinge"
    disc_ndf: int = 64
    disc_layers: int = 3

    def validate(self) -> None:
        for k in ("reconstruction_weight", "perceptual_weight", "codebook_weight", "disc_weight"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0")
        if self.disc_start < 0:
            raise ValueError("disc_start must be >= 0")


def hinge_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())


def vanilla_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())


def non_saturating_d_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    # BCE(logits, target) — the reference passes (target, logits), which is a different (wrong) function
    return 0.5 * (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                  + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))


def hinge_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def non_saturating_g_loss(fake: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake))


_D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss, "non-saturating": non_saturating_d_loss}
_G_LOSSES = {"hinge": hinge_g_loss, "non-saturating": non_saturating_g_loss}


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """‖∇_last nll‖ / (‖∇_last g‖ + 1e-4), clamped to [0, 1e4] and detached (Esser et al.)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


class VQLoss(nn.Module):
    """Holds the discriminator (trained) and LPIPS (frozen); the VQ model's quantizer supplies its own losses."""

    def __init__(self, cfg: VQLossConfig, lpips: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.discriminator = PatchGANDiscriminator(3, cfg.disc_ndf, cfg.disc_layers)
        if cfg.perceptual_weight > 0 and lpips is None:
            from argen.model.lpips import LPIPS
            lpips = LPIPS.from_dir(cfg.lpips_dir)
        self.lpips = lpips if cfg.perceptual_weight > 0 else None
        self.d_loss_fn = _D_LOSSES[cfg.disc_loss]
        self.g_loss_fn = _G_LOSSES[cfg.gen_loss]

    def gan_active(self, iteration: int) -> bool:
        """`iteration` is 1-based (the first optimizer step is iteration 1)."""
        return iteration >= self.cfg.disc_start

    def reconstruction_loss(self, x: torch.Tensor, xr: torch.Tensor) -> torch.Tensor:
        x, xr = x.float(), xr.float()
        return F.mse_loss(xr, x) if self.cfg.reconstruction == "l2" else F.l1_loss(xr, x)

    def generator_loss(self, x: torch.Tensor, xr: torch.Tensor, quant, iteration: int,
                       last_layer: torch.Tensor | None = None,
                       discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Total generator loss and its parts (floats, for logging)."""
        c = self.cfg
        rec = self.reconstruction_loss(x, xr)
        p = self.lpips(x, xr).mean() if self.lpips is not None else rec.new_zeros(())
        nll = c.reconstruction_weight * rec + c.perceptual_weight * p
        q_loss = quant.vq_loss + quant.commit_loss + quant.entropy_loss
        total = nll + c.codebook_weight * q_loss
        g = rec.new_zeros(())
        weight = 0.0
        if self.gan_active(iteration) and c.disc_weight > 0:
            disc = discriminator if discriminator is not None else self.discriminator
            # no gradient into D here: its parameters get theirs only in the discriminator step
            flags = [q.requires_grad for q in disc.parameters()]
            disc.requires_grad_(False)
            try:
                g = self.g_loss_fn(disc(xr.contiguous()).float())
            finally:
                for q, f in zip(disc.parameters(), flags):
                    q.requires_grad_(f)
            a = (adaptive_weight(nll, g, last_layer) if c.disc_adaptive_weight and last_layer is not None
                 else torch.ones((), device=g.device))
            weight = c.disc_weight * float(a)
            total = total + c.disc_weight * a * g
        logs = {k: float(v.detach()) for k, v in (("loss_rec", rec), ("loss_lpips", p), ("loss_vq", quant.vq_loss),
                ("loss_commit", quant.commit_loss), ("loss_entropy", quant.entropy_loss), ("loss_g_adv", g),
                ("loss_total", total))}
        logs["gan_weight"] = weight
        return total, logs

    def discriminator_loss(self, x: torch.Tensor, xr: torch.Tensor, iteration: int,
                           discriminator: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        disc = discriminator if discriminator is not None else self.discriminator
        real = disc(x.detach().contiguous()).float()
        fake = disc(xr.detach().contiguous()).float()
        factor = self.cfg.disc_weight if self.gan_active(iteration) else 0.0
        d = factor * self.d_loss_fn(real, fake)
        return d, {"loss_d": float(d.detach()), "logits_real": float(real.detach().mean()),
                   "logits_fake": float(fake.detach().mean())}
