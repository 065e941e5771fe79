"""`argen models`: the model zoo with exact parameter counts, computed from modules built on the meta device."""
from __future__ import annotations

import argparse

import torch

from argen.model.gpt import GPT, GPT_SIZES, count_parameters, gpt_config
from argen.model.vq import VQ_SIZES, VQModel


def gpt_rows(image_size: int) -> list[tuple]:
    rows = []
    for name in GPT_SIZES:
        counts = {}
        for mt in ("c2i", "t2i"):
            cfg = gpt_config(name, image_size=image_size, model_type=mt)
            with torch.device("meta"):
                counts[mt] = count_parameters(GPT(cfg))
        rows.append((name, cfg.n_layer, cfg.n_head, cfg.dim, cfg.head_dim, cfg.ffn_hidden, counts["c2i"], counts["t2i"]))
    return rows


def vq_rows() -> list[tuple]:
    rows = []
    for name, cfg in VQ_SIZES.items():
        with torch.device("meta"):
            m = VQModel(cfg)
        rows.append((name, cfg.codebook_size, cfg.codebook_embed_dim, count_parameters(m)))
    return rows


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="argen models", description=(
        "List every GPT size and VQ tokenizer with exact parameter counts (vocabulary 16384, 1000 classes; t2i "
        "counts exclude the stored 120x2048 uncond caption buffer). Modules are built on the meta device, so the "
        "large models cost no memory."))
    p.add_argument("--image-size", type=int, default=256, help="resolution (changes nothing in the counts; shown for the grid)")
    args = p.parse_args(argv)
    grid = args.image_size // 16
    print(f"GPT models (c2i/t2i, vocab 16384, {args.image_size}px = {grid}x{grid} tokens)")
    print(f"{'name':<10} {'layers':>6} {'heads':>5} {'dim':>5} {'head':>4} {'ffn':>6} {'params c2i':>15} {'params t2i':>15}")
    for name, nl, nh, d, hd, ffn, c, t in gpt_rows(args.image_size):
        print(f"{name:<10} {nl:>6} {nh:>5} {d:>5} {hd:>4} {ffn:>6} {c:>15,} {t:>15,}")
    print()
    print("VQ tokenizers")
    print(f"{'name':<10} {'codebook':>8} {'dim':>4} {'params':>15}")
    for name, k, d, n in vq_rows():
        print(f"{name:<10} {k!s:>8} {d!s:>4} {n:>15,}")
    return 0
