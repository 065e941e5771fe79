"""Batched CFG + temperature + top-k + top-p with per-row parameters as device tensors.

Each function is the row-wise twin of argen.model.generate's scalar version and performs the same floating-point
operations per row, so a row sampled here with a request's own generator gets the same token as `argen.generate`
would give it. Which branches run (any top-k, any top-p) is decided from host-side request parameters, never by
reading device values, so no step waits on the device.
"""
from __future__ import annotations

import torch



def combine_cfg(pair_logits: torch.Tensor, scale: torch.Tensor, use_cfg: torch.Tensor) -> torch.Tensor:
    """pair_logits (m, 2, V) with row 0 = cond, row 1 = uncond of the same slot -> (m, V).

    Slots without CFG keep their cond logits untouched (generate skips the formula there, and u + 1*(c-u) is not
    bit-identical to c)."""
    c, u = pair_logits[:, 0], pair_logits[:, 1]
    guided = u + scale[:, None] * (c - u)
    return torch.where(use_cfg[:, None], guided, c)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  k_max: int, any_top_p: bool, same_k: bool = False, unit_temperature: bool = False) -> torch.Tensor:
    """temperature (m,) already clamped to >= 1e-5; top_k (m,) long, 0 = off; top_p (m,) float, 1.0 = off.

    Host facts about the rows: k_max the largest top_k, any_top_p whether any row has top_p < 1, same_k whether
    every row has top_k == k_max, unit_temperature whether every temperature is 1 (x / 1 == x, so skipping the
    division changes no bit)."""
    if not unit_temperature:
        logits = logits / temperature[:, None]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype, device=logits.device)
    V = logits.shape[-1]
    if k_max > 0:
        k_max = min(k_max, V)
        if same_k:
            # the same order statistic as topk(...)[-1]: the smallest of the k selected, without sorting them
            kth = torch.topk(logits, k_max, dim=-1, sorted=False).values.amin(-1, keepdim=True)
        else:
            top = torch.topk(logits, k_max, dim=-1).values  # sorted, so column k-1 is the k-th largest
            kth = top.gather(1, (top_k.clamp(1, k_max) - 1)[:, None])
        drop = (logits < kth) & (top_k > 0)[:, None]
        logits = torch.where(drop, neg_inf, logits)
    if any_top_p:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove = cum > top_p[:, None]
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        # rows at top_p == 1 skip the filter in generate (a float cumsum can exceed 1.0)
        remove &= (top_p < 1.0)[:, None]
        logits = torch.where(remove.scatter(-1, idx, remove), neg_inf, logits)
    return logits


def sample_top_candidates(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                          k_max: int, any_top_p: bool, generator: torch.Generator | None, same_k: bool = False,
                          unit_temperature: bool = False) -> torch.Tensor:
    """The same distribution as filter_logits + softmax + multinomial, for rows that all have top_k > 0, with less
    work: unseeded requests promise the distribution, not a particular random stream. Returns tokens (m,).

    Select each row's k_max best logits (unsorted when every row has the same k and no top-p: selection without a
    sort), apply temperature to those k values only, top-p on the sorted candidates, then Gumbel-max over the
    candidates (k uniforms per row instead of the V exponentials torch.multinomial draws)."""
    k_max = min(k_max, logits.shape[-1])
    need_order = any_top_p or not same_k
    vals, idx = torch.topk(logits, k_max, dim=-1, sorted=need_order)
    if not unit_temperature:
        vals = vals / temperature[:, None]  # monotone: the same candidates as filtering after the division
    neg_inf = torch.tensor(float("-inf"), dtype=vals.dtype, device=vals.device)
    if not same_k:
        col = torch.arange(k_max, device=logits.device)
        vals = torch.where(col[None] < top_k[:, None], vals, neg_inf)
    if any_top_p:
        cum = vals.softmax(-1).cumsum(-1)
        remove = cum > top_p[:, None]
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        remove &= (top_p < 1.0)[:, None]
        vals = torch.where(remove, neg_inf, vals)
    u = torch.rand(vals.shape, generator=generator, device=vals.device).clamp_(min=1e-20)
    choice = (vals.float() - torch.log(-torch.log(u))).argmax(-1, keepdim=True)
    return idx.gather(1, choice)[:, 0]
