"""Token sampling shared by `argen.generate` and the serving engine: one implementation, so a seeded request gets
the same codes from both.

Per step and image, as the reference (LlamaGen `autoregressive/models/generate.py`): CFG -> temperature -> top-k ->
top-p -> draw. Two changes of arithmetic keep the distribution and cut the work of a decode step:
- CFG is applied to the final (normed) hidden state, before the output head. The head is linear without a bias, so
  head(u + s(c - u)) = head(u) + s(head(c) - head(u)), and the head runs on one row per image instead of two.
- The draw is inverse-CDF sampling over the candidates (the top-k when top_k > 0, else the whole vocabulary) with
  one uniform number per image, instead of torch.multinomial over the masked vocabulary (V exponentials per row).
Callers pass the uniforms in, so each caller decides whose generator supplies which rows.
"""
from __future__ import annotations

import torch


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """CFG on hidden states (m, dim): u + scale * (c - u), computed in fp32, returned in the inputs' dtype."""
    c, u = cond.float(), uncond.float()
    return (u + scale * (c - u)).to(cond.dtype)


def candidates(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (m, V) -> (probs (m, C), index (m, C) or None): the filtered distribution over C candidates and each
    candidate's token id (None: the candidates are the whole vocabulary in order). Removed candidates have mass 0.

    Temperature (clamped at 1e-5), then top-k, then HF-style top-p: a candidate is kept while the mass before it is
    at most top_p, so the first one past p and the top-1 are always kept."""
    V = logits.shape[-1]
    k = min(int(top_k), V) if top_k > 0 else V  # torch.topk takes an int; a whole float (5.0) is valid input
    index = None
    if k < V:
        logits, index = torch.topk(logits, k, dim=-1, sorted=top_p < 1.0)  # order is needed only for top-p
    elif top_p < 1.0:
        logits, index = torch.sort(logits, dim=-1, descending=True)
    if temperature != 1.0:
        logits = logits / max(temperature, 1e-5)  # monotone: the same top-k as dividing first
    probs = logits.float().softmax(-1)
    if top_p < 1.0:
        mass_before = torch.cat([torch.zeros_like(probs[:, :1]), probs.cumsum(-1)[:, :-1]], dim=-1)
        probs = probs.masked_fill(mass_before > top_p, 0.0)
    return probs, index


def draw(probs: torch.Tensor, index: torch.Tensor | None, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse CDF: uniform (m,) in [0, 1) picks, per row, the first candidate whose cumulative mass exceeds
    uniform * total mass. Returns token ids (m,) long.

    No clamp is needed: for u < 1, u * total rounds to below total (total - total * 2^-53 is more than half an ulp
    below total, or exactly representable when total is a power of two), so the first cdf > target exists, and it
    exceeds its predecessor, so the candidate it picks has mass."""
    cdf = probs.double().cumsum(-1)  # fp64: 16384 fp32 additions would blur the smallest candidates' mass
    target = uniform.to(cdf.dtype)[:, None] * cdf[:, -1:]
    choice = torch.searchsorted(cdf, target, right=True)[:, 0]
    return choice if index is None else index.gather(1, choice[:, None])[:, 0]


def uniforms(n: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """The random numbers one request's n images consume per step (fp64: 53 bits, finer than any candidate's mass)."""
    return torch.rand(n, dtype=torch.float64, generator=generator, device=device)


def sample(logits: torch.Tensor, uniform: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> torch.Tensor:
    """logits (m, V) and uniforms (m,) -> token ids (m,)."""
    probs, index = candidates(logits, temperature, top_k, top_p)
    return draw(probs, index, uniform)
