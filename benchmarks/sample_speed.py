"""Sampling speed: a naive sampler, a reference-style sampler and argen.generate on the same weights and batch.

Protocol (issue 2): GPT-B c2i, 4 class labels with CFG 2.0 (8 rows), 256 image tokens, full vocabulary (top-k 0).
- naive: no cache, a full forward over the whole prefix for every token (quadratic work);
- reference-style: the port of LlamaGen's sampler in tests/llamagen_reference.py (caches and a (B, S, S) mask
  re-allocated per call, the full-length cache attended with a mask every step, math attention);
- argen.generate: KV cache sized to the request, decode attends only the filled prefix, SDPA kernels.
All three run the same weights in the same dtype. The naive sampler is timed on --naive-tokens tokens only (it is
quadratic) and reported per token; the others over the whole image.

    python benchmarks/sample_speed.py [--model GPT-B] [--tokens 256] [--dtype fp32|bf16] [--repeats 2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_speed import reference_model, timed as timed_best  # noqa: E402  (the one timing harness)

from argen.model.generate import generate  # noqa: E402
from argen.model.gpt import GPT, gpt_config  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Best wall seconds of fn(None) (a whole image) after a warm-up fn(8) on a few tokens (allocator, kernels)."""
    fn(8)
    return timed_best(lambda: fn(None), repeats, "cpu")[0]


@torch.no_grad()
def naive_generate(model: GPT, labels: torch.Tensor, n_tokens: int, cfg_scale: float) -> torch.Tensor:
    B = labels.shape[0]
    cond = torch.cat([labels, model.null_condition(B, labels.device)])
    codes = torch.zeros(2 * B, 1, dtype=torch.long)
    for _ in range(n_tokens):
        logits = model(codes, cond)[:, -1]  # forward over the whole prefix; last position predicts the next code
        c, u = logits[:B], logits[B:]
        nxt = torch.multinomial((u + cfg_scale * (c - u)).softmax(-1), 1)
        codes = torch.cat([codes[:, :-1], torch.cat([nxt, nxt]), torch.zeros(2 * B, 1, dtype=torch.long)], 1)
    return codes[:B, :-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="GPT-B")
    ap.add_argument("--tokens", type=int, default=256, choices=[256, 576, 1024])
    ap.add_argument("--labels", type=int, default=4)
    ap.add_argument("--cfg-scale", type=float, default=2.0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--naive-tokens", type=int, default=32, help="tokens timed for the quadratic naive sampler")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    image_size = {256: 256, 576: 384, 1024: 512}[args.tokens]
    cfg = gpt_config(args.model, image_size=image_size, rope_prefix="reference")
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    for p in ours.output.parameters():
        torch.nn.init.normal_(p, std=0.02)
    ours.to(dtype)
    ref, ref_module = reference_model(ours)
    labels = torch.arange(args.labels) * 7 % cfg.num_classes
    n = cfg.block_size
    print(f"model {args.model} c2i, {args.labels} labels x CFG {args.cfg_scale} ({2 * args.labels} rows), {n} tokens, "
          f"vocab {cfg.vocab_size}, top-k 0, dtype {args.dtype}, torch threads {torch.get_num_threads()}")

    t_ref = timed(lambda k: ref_module.generate(ref, labels, k or n, cfg_scale=args.cfg_scale, top_k=0), args.repeats)
    t_argen = timed(lambda k: generate(ours, labels, cfg_scale=args.cfg_scale, top_k=0, seed=0, num_tokens=k),
                    args.repeats)
    k = min(args.naive_tokens, n)
    t_naive_k = timed(lambda kk: naive_generate(ours, labels, kk or k, args.cfg_scale), 1)
    # the naive sampler's cost grows with the prefix; a k-token run understates a full image, so report per token
    per_tok = {"naive (first %d tokens)" % k: t_naive_k / k, "reference-style": t_ref / n, "argen.generate": t_argen / n}
    print(f"{'sampler':<28} {'ms/token':>9} {'images/s':>9}")
    for name, s in per_tok.items():
        print(f"{name:<28} {s * 1e3:>9.2f} {args.labels / (s * n):>9.3f}")
    print(f"ratio argen.generate / reference-style: {t_ref / t_argen:.2f}x faster")
    print(f"ratio argen.generate / naive (per token, naive on its first {k} tokens only): "
          f"{(t_naive_k / k) / (t_argen / n):.2f}x faster")


if __name__ == "__main__":
    main()
