"""`argen eval`: sample at scale to .npz, score a sample batch, watch a training run and score its exports."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from argen.errors import ArgenError
from argen.eval.npz import sidecar_path


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling protocol (flags override --config, which overrides the defaults)")
    g.add_argument("--config", help="YAML file of protocol settings (keys as the flags, e.g. "
                                    "configs/eval-c2i-balanced.yaml): a pinned, versioned harness")
    g.add_argument("--protocol", choices=["balanced", "reference"],
                   help="balanced: labels i %% classes, seed per global batch, same images for any GPU count, "
                        "resumable (default). reference: LlamaGen's uniform random labels, seed per rank")
    g.add_argument("--num", type=int, help="number of images (default 50000)")
    g.add_argument("--batch-size", type=int, help="images per rank and step (default 32)")
    g.add_argument("--cfg-scale", type=float,
                   help="classifier-free guidance; default: the published FID value for the model size "
                        "(B/L 2.0, XL/XXL 1.75, 3B 1.65, else 1.5)")
    g.add_argument("--cfg-schedule", help="constant (default), linear, or an integer cfg interval")
    g.add_argument("--temperature", type=float, help="default 1.0")
    g.add_argument("--top-k", type=int, help="default 0 = full vocabulary (the FID setting)")
    g.add_argument("--top-p", type=float, help="default 1.0")
    g.add_argument("--seed", type=int, help="default 0")
    g.add_argument("--image-size-eval", type=int,
                   help="resize generated images to this size (default 256; 0 keeps the generated size)")
    g.add_argument("--resize", choices=["bicubic", "bicubic-aa", "none"],
                   help="bicubic without antialias before the uint8 clamp, as the reference (default)")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="GPT dtype: auto = bf16 on an accelerator (the reference), fp32 on CPU (default auto)")
    g.add_argument("--captions", help="t2i: .npz with features (M,T,D), optional mask (M,T) and prompts (M,); "
                                      "image i uses caption i %% M")


def protocol_from_args(args):
    import dataclasses

    from argen.config import load_config
    from argen.eval.sample import SampleProtocol
    proto = load_config(SampleProtocol, args.config) if args.config else SampleProtocol()
    for f in dataclasses.fields(SampleProtocol):
        value = getattr(args, f.name, None)
        if value is not None:
            setattr(proto, f.name, value)
    if proto.image_size_eval == 0:
        proto.image_size_eval = None
    proto.validate()
    return proto


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="argen eval", description=(
        "Evaluate generators with the ADM evaluator's metric definitions (FID, sFID, IS, precision/recall) on a "
        "torch Inception-V3 loaded from a local weight file, plus CLIP score for text-to-image. See the README, 'Evaluation'."))
    sub = p.add_subparsers(dest="command", metavar="{sample,score,watch,reconstruct}")

    s = sub.add_parser("sample", help="generate N images from a GPT export into an .npz (all ranks)",
                       description="Generate images across all ranks (torchrun/srun/single process) into OUT.npz "
                                   "(arr_0 = N×H×W×3 uint8) and record the protocol in OUT.json.")
    s.add_argument("ckpt", help="GPT model directory (config.json + model.safetensors)")
    s.add_argument("--vq", required=True, help="VQ tokenizer directory used to decode the codes")
    s.add_argument("--out", required=True, help="output .npz path")
    _sampling_args(s)

    c = sub.add_parser("score", help="score SAMPLES.npz against REF.npz; print and write the metrics as JSON",
                       description="FID (the reference's stored mu/sigma when present), sFID, Inception Score "
                                   "(splits of 5000 in file order), precision/recall (k=3); with --paired also "
                                   "rFID/PSNR/SSIM; with --clip the CLIP score.")
    c.add_argument("samples", help="sample batch .npz (arr_0 = N×H×W×3 uint8)")
    c.add_argument("ref", nargs="?", help="reference batch .npz, e.g. VIRTUAL_imagenet256_labeled.npz")
    c.add_argument("--inception", help="FID Inception weights (default $ARGEN_INCEPTION_WEIGHTS or "
                                       "~/.cache/argen/weights/pt_inception-2015-12-05-6726825d.pth)")
    c.add_argument("--out", help="JSON output (default SAMPLES.metrics.json)")
    c.add_argument("--batch-size", type=int, default=64)
    c.add_argument("--no-cache", action="store_true", help="recompute reference features instead of caching them")
    c.add_argument("--paired", action="store_true",
                   help="samples are reconstructions of REF in order: report rFID, PSNR, SSIM")
    c.add_argument("--clip", help="local CLIP directory (HF save_pretrained layout) for the CLIP score")
    c.add_argument("--prompts", help="prompts for --clip: .txt, .csv/.tsv with a Prompt column, or .npz 'prompts' "
                                     "(default: the captions file recorded in SAMPLES.json)")

    r = sub.add_parser("reconstruct", help="encode+decode an image batch with a VQ export (for rFID/PSNR/SSIM)",
                       description="Write OUT.npz with the VQ reconstructions of IMAGES.npz in the same order; then "
                                   "`argen eval score OUT.npz IMAGES.npz --paired` gives rFID, PSNR and SSIM.")
    r.add_argument("vq", help="VQ tokenizer directory")
    r.add_argument("images", help="originals .npz (arr_0 = N×H×W×3 uint8), e.g. an ImageNet-val 50k batch")
    r.add_argument("--out", required=True, help="output .npz")
    r.add_argument("--batch-size", type=int, default=32)

    w = sub.add_parser("watch", help="score every new export of a training run exactly once (cron-safe)",
                       description="Find RUN_DIR/exports/step-*/ without a result, claim each with a lock, sample, "
                                   "score, append to RUN_DIR/eval/results.jsonl, log to wandb and redraw "
                                   "RUN_DIR/eval/metrics.png. RUN_DIR may be local or an fsspec URL (s3://...).")
    w.add_argument("run_dir", help="training run directory or URL")
    w.add_argument("--vq", help="VQ tokenizer directory (local) decoding a GPT run's samples; a tokenizer run's "
                                "exports are scored by reconstructing --ref (paired rFID/PSNR/SSIM)")
    w.add_argument("--ref", help="reference batch .npz (local) for FID/sFID/IS/precision/recall")
    w.add_argument("--clip", help="local CLIP directory: also compute the CLIP score (t2i, needs --captions)")
    w.add_argument("--name", default="default",
                   help="evaluation name: records live under RUN_DIR/eval/results/NAME/ (one per protocol)")
    w.add_argument("--inception", help="FID Inception weights (see `argen eval score --help`)")
    w.add_argument("--once", action="store_true", help="evaluate what is pending, then exit (for cron/scrontab)")
    w.add_argument("--status", action="store_true", help="print where each export stands (done/running/failed/"
                                                         "pending) and exit")
    w.add_argument("--interval", type=float, default=300, help="seconds between scans without --once (default 300)")
    w.add_argument("--lock-ttl", type=float, default=1800,
                   help="a claim whose heartbeat is older than this many seconds is taken over (default 1800)")
    w.add_argument("--max-attempts", type=int, default=3, help="give up on an export after this many failures")
    w.add_argument("--work-dir", help="local scratch for sample batches (default: a temp dir)")
    w.add_argument("--keep-samples", action="store_true", help="keep each export's sample .npz in --work-dir")
    w.add_argument("--wandb", choices=["auto", "online", "offline", "off"], default="auto",
                   help="auto: online with credentials, else offline (default)")
    w.add_argument("--wandb-project", default="argen-eval")
    _sampling_args(w)
    return p


def _print_metrics(result: dict) -> None:
    for k, v in result["metrics"].items():
        print(f"{k:>16}: {v:.4f}")
    for k, why in result.get("skipped", {}).items():
        print(f"{k:>16}: skipped ({why})")


def _score(args) -> int:
    from argen.eval import score as sc
    if not args.ref and not args.clip:
        raise ArgenError("give a reference batch REF.npz, or --clip DIR for a CLIP score, or both")
    if args.ref:
        result = sc.score(args.samples, args.ref, inception=args.inception, batch_size=args.batch_size,
                          use_cache=not args.no_cache, paired=args.paired)
    else:
        result = {"metrics": {}, "samples": {"path": args.samples}}
    if args.clip:
        prompts_file, cycle = args.prompts, False
        side = sidecar_path(args.samples)
        if not prompts_file and side.is_file():
            prompts_file = json.loads(side.read_text()).get("protocol", {}).get("captions")
            cycle = True  # `argen eval sample` used caption i % M for image i
        if not prompts_file:
            raise ArgenError("--clip needs --prompts FILE (no captions file recorded beside the samples)")
        from argen.eval.clip_score import read_prompts
        clip = sc.clip_metrics(args.samples, args.clip, read_prompts(prompts_file), batch_size=args.batch_size,
                               cycle=cycle)
        result["metrics"].update(clip["metrics"])
        result["clip"] = clip["clip"]
        result["clip"]["prompts"] = str(prompts_file)
    out = Path(args.out) if args.out else sc.default_output(args.samples)
    out.write_text(json.dumps(result, indent=2))
    _print_metrics(result)
    print(f"wrote {out}")
    return 0


def _sample(args) -> int:
    from argen.eval.sample import Sampler
    from argen.launcher import dist_env
    proto = protocol_from_args(args)
    env, device = dist_env.init(timeout_s=3600)
    barrier = None
    if env.world_size > 1:
        import torch.distributed as dist
        barrier = dist.barrier
    sampler = Sampler(args.ckpt, args.vq, precision=proto.precision, device=device)
    record = sampler.run(proto, args.out, rank=env.rank, world=env.world_size, captions=args.captions,
                         barrier=barrier)
    if env.is_main:
        print(f"wrote {record['shape'][0]} images {tuple(record['shape'][1:])} to {args.out} "
              f"(protocol in {sidecar_path(args.out)})")
    return 0


def _reconstruct(args) -> int:
    from argen.eval.reconstruct import reconstruct
    record = reconstruct(args.vq, args.images, args.out, batch_size=args.batch_size)
    print(f"wrote {record['source']['num_images']} reconstructions to {args.out}; score them with "
          f"`argen eval score {args.out} {args.images} --paired`")
    return 0


def _watch(args) -> int:
    from argen.eval.watch import WatchOptions, print_status, watch
    if args.status:
        print_status(WatchOptions(run_dir=args.run_dir, name=args.name, lock_ttl=args.lock_ttl,
                                  max_attempts=args.max_attempts))
        return 0
    if not args.ref and not args.clip:
        raise ArgenError("argen eval watch needs --ref REF.npz, or --clip DIR for t2i, or both")
    opts = WatchOptions(run_dir=args.run_dir, vq=args.vq, ref=args.ref, inception=args.inception,
                        protocol=protocol_from_args(args), captions=args.captions, clip=args.clip,
                        name=args.name, lock_ttl=args.lock_ttl,
                        max_attempts=args.max_attempts, work_dir=args.work_dir, keep_samples=args.keep_samples,
                        wandb=args.wandb, wandb_project=args.wandb_project)
    return watch(opts, once=args.once, interval=args.interval)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    return {"sample": _sample, "score": _score, "watch": _watch, "reconstruct": _reconstruct}[args.command](args)
