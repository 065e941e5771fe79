"""`argen convert`: import LlamaGen checkpoints (GPT and VQ) into argen model directories."""
from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="argen convert", description=(
        "Convert a released LlamaGen checkpoint into an argen model directory (config.json + model.safetensors) "
        "that argen.model.load() reads. Keys are mapped strictly: every key used, none missing, shapes checked."))
    sub = p.add_subparsers(dest="what", required=True)
    g = sub.add_parser("llamagen-gpt", help="a GPT checkpoint (c2i_*.pt, t2i_*.pt, FSDP consolidated.pth)")
    g.add_argument("src", help="path to the .pt/.pth file")
    g.add_argument("out_dir", help="output directory")
    g.add_argument("--model", required=True, help="size name, e.g. GPT-B, GPT-L, GPT-XL, GPT-XXL, GPT-3B")
    g.add_argument("--image-size", type=int, default=256, help="resolution the checkpoint was trained at (256/384/512)")
    g.add_argument("--t2i", action="store_true", help="text-conditional checkpoint (120 caption tokens)")
    v = sub.add_parser("llamagen-vq", help="a VQ tokenizer checkpoint (vq_ds16_c2i.pt, vq_ds8_c2i.pt, vq_ds16_t2i.pt)")
    v.add_argument("src")
    v.add_argument("out_dir")
    v.add_argument("--model", default="VQ-16", help="VQ-16 or VQ-8")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.what == "llamagen-gpt":
        from argen.model.convert_llamagen import convert_llamagen_gpt
        out = convert_llamagen_gpt(args.src, args.out_dir, args.model, image_size=args.image_size, t2i=args.t2i)
    else:
        from argen.model.convert_vq import convert_llamagen_vq
        out = convert_llamagen_vq(args.src, args.out_dir, args.model)
    print(f"wrote {out}")
    return 0
