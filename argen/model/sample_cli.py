"""`argen sample`: draw image codes from a GPT directory, optionally decode them to a PNG grid with a VQ."""
from __future__ import annotations

import argparse

import numpy as np
import torch

from argen import device as dev
from argen.errors import ArgenError
from argen.model.pixels import save_grid


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="argen sample", description=(
        "Sample image tokens from an argen GPT directory (config.json + model.safetensors, e.g. a training export or "
        "an `argen convert` output). With --vq the codes are decoded and saved as a PNG grid; --save-codes always "
        "writes the raw codes (B, N) as .npy."))
    p.add_argument("ckpt", help="GPT model directory")
    p.add_argument("--labels", default="0,1,2,3", help="c2i: comma-separated class labels (default 0,1,2,3)")
    p.add_argument("--captions", help="t2i: .npz with 'features' (B,T,D) and optional 'mask' (B,T) caption features")
    p.add_argument("--prompts", nargs="*", help="t2i: prompts, encoded with the T5 at --t5")
    p.add_argument("--t5", help="t2i: local T5 encoder directory (save_pretrained layout)")
    p.add_argument("--vq", help="VQ tokenizer directory used to decode codes into images")
    p.add_argument("--out", default="samples.png", help="PNG grid path (needs --vq)")
    p.add_argument("--save-codes", help="write the sampled codes to this .npy file")
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--cfg-schedule", default=None, help="constant (default), linear, or an integer cfg interval")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=2000)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="weights/activations dtype")
    return p


def _condition(model, args) -> tuple[torch.Tensor, torch.Tensor | None]:
    cfg = model.config
    if cfg.model_type == "c2i":
        try:
            labels = [int(x) for x in args.labels.split(",") if x.strip()]
        except ValueError:
            raise ArgenError(f"--labels must be comma-separated integers, got '{args.labels}'") from None
        return torch.tensor(labels, dtype=torch.long), None
    if args.captions:
        data = np.load(args.captions)
        if "features" not in data:
            raise ArgenError(f"{args.captions} has no 'features' array")
        feats = torch.from_numpy(data["features"]).float()
        mask = torch.from_numpy(data["mask"]).bool() if "mask" in data else None
        return feats, mask
    if args.prompts:
        if not args.t5:
            raise ArgenError("t2i prompts need --t5 PATH (a local T5 encoder directory)")
        from argen.serve.text import PromptEncoder  # noqa: PLC0415 - transformers is a heavy import
        return PromptEncoder(args.t5, cfg.cls_token_num, cfg.caption_dim)(args.prompts)
    raise ArgenError("t2i models need --captions FILE.npz or --prompts with --t5")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from argen.model import load
    from argen.model.generate import generate, parse_cfg_schedule
    device = dev.default_device()
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    model = load(args.ckpt, device=device, dtype=dtype)
    if model.kind != "gpt":
        raise ArgenError(f"{args.ckpt} holds a '{model.kind}' model, not a GPT")
    cond, mask = _condition(model, args)
    if cond.is_floating_point() and dtype is not None:
        cond = cond.to(dtype)
    codes = generate(model, cond.to(device), cond_mask=None if mask is None else mask.to(device),
                     cfg_scale=args.cfg_scale, cfg_schedule=parse_cfg_schedule(args.cfg_schedule),
                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.save_codes:
        np.save(args.save_codes, codes.cpu().numpy().astype(np.int64))
        print(f"wrote codes {tuple(codes.shape)} to {args.save_codes}")
    if args.vq:
        vq = load(args.vq, device=device)
        if vq.kind != "vq":
            raise ArgenError(f"{args.vq} holds a '{vq.kind}' model, not a VQ tokenizer")
        if vq.codebook_size < model.config.vocab_size:
            raise ArgenError(f"VQ codebook ({vq.codebook_size}) is smaller than the GPT vocabulary ({model.config.vocab_size})")
        g = model.config.grid
        with torch.inference_mode():
            images = vq.decode(codes.view(-1, g, g))
        save_grid(images.float(), args.out)
        print(f"wrote {codes.shape[0]} images to {args.out}")
    elif not args.save_codes:
        print("sampled codes; pass --vq DIR to decode them or --save-codes FILE.npy to keep them")
    return 0
