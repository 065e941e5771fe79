"""Training throughput: a plain PyTorch loop in the reference's style vs argen, same model, same batch, one run.

    python benchmarks/train_step.py                       # CPU section (and the GPU section when a GPU is present)
    python benchmarks/train_step.py --model GPT-small --batch 4 --steps 6 --rounds 3

Baseline (LlamaGen train_c2i.py, §5.2): model(codes, labels) -> cross-entropy, loss.backward(),
clip_grad_norm_(1.0), AdamW (0.9, 0.95, wd 0.05 on ndim >= 2) .step(), zero_grad(set_to_none=True).
argen: (a) `parallelize(...)` single-process path and its `train_step` on the same batch (the machinery the loop
drives; with tp = pp = dp = 1 neither megatron nor DeepSpeed is touched); (b) the whole `argen train` loop
(synthetic code data, metrics, no checkpoints) for the same number of steps, which adds data and logging.
Rounds alternate baseline and argen (and which goes first) so load on a shared machine hits both alike; the
median step time is reported.

GPU section (when an accelerator is present): tokens/s and MFU of argen's single-process step for GPT-B/L/XL,
bf16 autocast, with MFU = flops_per_token (6 N_matmul + causal attention, see argen.launcher.metrics_log) x tokens/s
/ argen.device.peak_flops.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from argen import device as dev  # noqa: E402
from argen.model.gpt import GPT, gpt_config, gpt_loss  # noqa: E402


def make_batch(cfg, batch, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size), generator=g).to(device)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=g).to(device)
    return codes, labels


def baseline_steps(cfg, codes, labels, steps, device, dtype):
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), fused=dev.is_accelerator(device) or None)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        with dev.autocast(device, dtype):
            logits = model(codes, labels)
        loss = gpt_loss(logits, codes)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dev.synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def argen_steps(cfg, codes, labels, steps, device, dtype_name):
    from argen.launcher.train_config import OptimSection
    from argen.parallel import Layout, parallelize
    torch.manual_seed(0)
    model = GPT(cfg).train()
    par = parallelize(model, Layout(), ocfg=OptimSection(), micro_batch=codes.shape[0], accum=1,
                      precision=dtype_name, max_steps=steps, device=device)
    mb = [{"codes": codes, "cond": labels}]
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        par.train_step(mb)
        dev.synchronize(device)
        times.append(time.perf_counter() - t)
    return times


def argen_loop_tokens_per_s(model_name, batch, steps, precision, image_size):
    from argen.config import load_config
    from argen.launcher.train_config import TrainConfig
    from argen.launcher.train_gpt import train
    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(TrainConfig, data={
            "run_dir": d, "model": {"name": model_name, "image_size": image_size, "dropout": 0.0,
                                    "token_dropout": 0.0, "class_dropout": 0.0},
            "data": {"source": "synthetic", "synthetic_samples": 4096},
            "train": {"global_batch": batch, "max_steps": steps + 1, "precision": precision, "checkpoint_every": 0,
                      "export_every": 10 ** 9, "resume": "none"},
            "log": {"every": 1, "wandb": "off"}})
        times = []
        t = [time.perf_counter()]

        def hook(step, _out):
            now = time.perf_counter()
            if step > 1:  # skip the first (warm-up) step
                times.append(now - t[0])
            t[0] = now
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            train(cfg, on_step=hook)
    gcfg = cfg.model.gpt_config()
    return batch * gcfg.block_size / statistics.median(times)


def cpu_section(args):
    device = torch.device("cpu")
    cfg = gpt_config(args.model, args.image_size, token_dropout_p=0.0, resid_dropout_p=0.0, ffn_dropout_p=0.0,
                     class_dropout_prob=0.0)
    codes, labels = make_batch(cfg, args.batch, device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None
    tokens = args.batch * cfg.block_size
    base, ours = [], []
    for r in range(args.rounds):  # alternate which side goes first; the first step of each run warms up
        if r % 2 == 0:
            base += baseline_steps(cfg, codes, labels, args.steps, device, dtype)[1:]
        ours += argen_steps(cfg, codes, labels, args.steps, device, args.precision)[1:]
        if r % 2 == 1:
            base += baseline_steps(cfg, codes, labels, args.steps, device, dtype)[1:]
    b_tps, a_tps = tokens / statistics.median(base), tokens / statistics.median(ours)
    n = sum(p.numel() for p in GPT(cfg).parameters())
    print(f"CPU  {args.model} ({n / 1e6:.1f}M params) {args.image_size}px batch {args.batch} x {cfg.block_size} tokens, "
          f"{args.precision}, {torch.get_num_threads()} threads, median of {len(base)} steps")
    print(f"  baseline (plain PyTorch loop, reference style): {b_tps:10.0f} tokens/s")
    print(f"  argen parallelize + train_step (tp=pp=dp=1):     {a_tps:10.0f} tokens/s   ratio {a_tps / b_tps:.3f}")
    if not args.no_loop:
        l_tps = argen_loop_tokens_per_s(args.model, args.batch, args.steps * args.rounds, args.precision,
                                        args.image_size)
        print(f"  argen train loop (synthetic data, metrics):     {l_tps:10.0f} tokens/s   ratio {l_tps / b_tps:.3f}")


def gpu_section(args):
    from argen.launcher.metrics_log import flops_per_token
    device = dev.default_device()
    peak = dev.peak_flops(device)
    print(f"GPU  {torch.cuda.get_device_name(device)}  peak {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s bf16")
    for name, batch in [("GPT-B", 64), ("GPT-L", 32), ("GPT-XL", 32)]:
        cfg = gpt_config(name, 256)
        codes, labels = make_batch(cfg, batch, device)
        try:
            base = baseline_steps(cfg, codes, labels, 8, device, torch.bfloat16)[3:]
            ours = argen_steps(cfg, codes, labels, 8, device, "bf16")[3:]
        except torch.OutOfMemoryError:
            print(f"  {name}: out of memory at batch {batch}")
            continue
        tokens = batch * cfg.block_size
        b_tps, a_tps = tokens / statistics.median(base), tokens / statistics.median(ours)
        mfu = flops_per_token(cfg) * a_tps / peak if peak else float("nan")
        print(f"  {name:7s} batch {batch:3d}: baseline {b_tps:9.0f} tok/s   argen {a_tps:9.0f} tok/s "
              f"(ratio {a_tps / b_tps:.3f})   argen MFU {100 * mfu:.1f}%")
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="GPT-tiny")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--no-loop", action="store_true", help="skip the whole-loop measurement")
    ap.add_argument("--gpu-only", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not dev.accelerator_available() else "cuda")
    if not args.gpu_only:
        cpu_section(args)
    if dev.accelerator_available():
        gpu_section(args)
    else:
        print("GPU  none present: GPU section skipped")


if __name__ == "__main__":
    main()
