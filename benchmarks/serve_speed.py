"""Sampling speed: the reference-style eager loop vs `argen.generate` vs the serving engine, in one run.

Protocol (LlamaGen serve/README and sample_c2i.py): 8 class labels with CFG (16 sequences), cfg 4.0, top-k 2000,
576 image tokens (384 px), AR sampling only (no VQ decode). Prints seconds per batch and images/s for each
sampler and the ratios. Random weights: speed does not depend on them.

    .venv/bin/python benchmarks/serve_speed.py                  # CPU: GPT-small, 1 thread; GPU: GPT-B
    .venv/bin/python benchmarks/serve_speed.py --model GPT-L    # any size; --tokens 256 for 256 px

On a shared CPU the thread count matters more than anything (OpenMP threads spin against other processes); the
script pins it (--threads, default 1) and prints it.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argen  # noqa: E402
from argen import device as dev  # noqa: E402
from argen.model.gpt import GPT, gpt_config  # noqa: E402
from argen.serve import Engine, Request  # noqa: E402

LABELS = [207, 360, 387, 974, 88, 979, 417, 279]  # the reference demo's labels


def reference_model(model: GPT):
    from tests import llamagen_reference as ref
    c = model.config
    args = ref.ModelArgs(dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, vocab_size=c.vocab_size,
                         num_classes=c.num_classes, block_size=c.block_size, cls_token_num=c.cls_token_num)
    r = ref.Transformer(args)
    r.load_state_dict(model.state_dict(), strict=True)
    p = model.output.weight
    return r.to(device=p.device, dtype=p.dtype).eval(), ref


def timed(fn, repeats: int, device) -> tuple[float, float]:
    """Best wall seconds and best process CPU seconds over `repeats` runs. On a shared CPU the CPU time (all
    threads of this process) is the contention-robust figure; on an accelerator only the wall time means much."""
    walls, cpus = [], []
    for _ in range(repeats):
        dev.synchronize(device)
        t, c = time.perf_counter(), time.process_time()
        fn()
        dev.synchronize(device)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="serve_speed", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="GPT size (default GPT-small on CPU, GPT-B on an accelerator)")
    ap.add_argument("--tokens", type=int, default=576, choices=[256, 576, 1024],
                    help="image tokens: 256 (256 px), 576 (384 px, the reference protocol), 1024 (512 px)")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--top-k", type=int, default=2000)
    ap.add_argument("--dtype", default="bf16", choices=["fp32", "bf16", "fp16"],
                    help="model, activations and cache (the reference samples in bf16)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = leave torch's default)")
    ap.add_argument("--compile", default="on", choices=["auto", "on", "off"],
                    help="engine decode step: on = compiled (with CUDA graphs on an accelerator); auto = the "
                         "Engine's default (eager on CPU)")
    ap.add_argument("--skip", default="", help="comma list of samplers to skip: reference,generate")
    ap.add_argument("--serving", action="store_true",
                    help="also run the serving scenario: the same images as independent one-image requests arriving "
                         "together (baselines answer them one after another; the engine batches them)")
    args = ap.parse_args(argv)

    device = dev.default_device()
    accel = dev.is_accelerator(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.model or ("GPT-B" if accel else "GPT-small")
    tokens = args.tokens
    grid = math.isqrt(tokens)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    model = GPT(gpt_config(name, image_size=grid * 16, rope_prefix="reference"))
    torch.nn.init.normal_(model.output.weight, std=0.02)  # zero-init head would make every sample uniform
    model = model.to(device=device, dtype=dtype).eval()
    labels = torch.tensor((LABELS * ((args.images + 7) // 8))[: args.images], device=device)
    skip = set(filter(None, args.skip.split(",")))
    print(f"device {device} ({'accelerator' if accel else f'CPU, {torch.get_num_threads()} thread(s)'}), "
          f"torch {torch.__version__}, model {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M), "
          f"{tokens} tokens ({grid * 16} px), {args.images} images x CFG {args.cfg} (= {2 * args.images} "
          f"sequences), top-k {args.top_k}, {str(dtype).replace('torch.', '')}, best of {args.repeats}")

    results: dict[str, tuple[float, float]] = {}

    if "reference" not in skip:
        ref_model, ref = reference_model(model)

        def run_ref():
            # the port builds its caches, masks and RoPE tables under the current default device, as LlamaGen does
            with torch.no_grad(), torch.device(device):
                ref.generate(ref_model, labels, tokens, cfg_scale=args.cfg, temperature=1.0, top_k=args.top_k,
                             top_p=1.0, sample_logits=True)
        results["reference-style eager loop"] = timed(run_ref, args.repeats, device)
        del ref_model

    if "generate" not in skip:
        def run_gen():
            argen.generate(model, labels, cfg_scale=args.cfg, top_k=args.top_k, seed=0)
        results["argen.generate"] = timed(run_gen, args.repeats, device)

    engine = Engine(model, max_batch=args.images, compile={"auto": "auto", "on": True, "off": False}[args.compile])
    seeded = Request(labels.cpu(), cfg_scale=args.cfg, top_k=args.top_k, seed=0)
    t = time.perf_counter()
    engine.generate(seeded)  # warm-up: compilation (and CUDA graph capture) happen here
    warm = time.perf_counter() - t
    # seeded: the codes argen.generate returns for this seed (bit for bit when the decode step runs eagerly)
    results["Engine"] = timed(lambda: engine.generate(seeded), args.repeats, device)
    serving: dict[str, tuple[float, float]] = {}
    if args.serving:
        singles = [Request([int(x)], cfg_scale=args.cfg, top_k=args.top_k, seed=i) for i, x in enumerate(labels)]
        if "reference" not in skip:
            ref_model, ref = reference_model(model)

            def run_ref_each():
                with torch.no_grad(), torch.device(device):
                    for x in labels:
                        ref.generate(ref_model, x[None], tokens, cfg_scale=args.cfg, top_k=args.top_k)
            serving["reference-style eager loop"] = timed(run_ref_each, args.repeats, device)
            del ref_model
        if "generate" not in skip:
            serving["argen.generate"] = timed(lambda: [argen.generate(model, x[None], cfg_scale=args.cfg,
                                                                      top_k=args.top_k, seed=0) for x in labels],
                                              args.repeats, device)
        serving["Engine"] = timed(lambda: engine.generate(singles), args.repeats, device)
    engine.close()

    print(f"engine warm-up {warm:.1f} s (compile: {args.compile}), not included below")
    report(results, args.images, accel, f"one batch of {args.images} labels")
    if serving:
        report(serving, args.images, accel, f"serving: {args.images} one-image requests at once")
    return 0


def report(results: dict[str, tuple[float, float]], images: int, accel: bool, title: str) -> None:
    base = results.get("reference-style eager loop")
    gen = results.get("argen.generate")
    for i, what in enumerate(["wall", "CPU"]):
        if i and accel:
            break
        print(f"-- {title}, {what} time" + (" (process CPU seconds: robust to other load on a shared machine)"
                                            if i else ""))
        for k, v in results.items():
            s = v[i]
            line = f"{k:<28} {s:8.2f} s/batch  {images / s:7.2f} img/s"
            if base:
                line += f"  x{base[i] / s:5.2f} vs reference loop"
            if gen:
                line += f"  x{gen[i] / s:5.2f} vs argen.generate"
            print(line)


if __name__ == "__main__":
    sys.exit(main())
