"""How close is `argen plan` to the measured peak memory of a training step?

Baseline: the peak measured in this run (CPU: live tensor bytes tracked op by op; accelerator: the allocator's
peak). argen: the planner's prediction for the same model, batch, precision and checkpointing at tp = pp = dp = 1.
Prints both, their ratio and the error for each config, and the largest error (target: within 15 %).

    .venv/bin/python benchmarks/plan_accuracy.py            # the CPU configs (~2-5 min on 2 busy cores)
    .venv/bin/python benchmarks/plan_accuracy.py --quick    # three small configs
    .venv/bin/python benchmarks/plan_accuracy.py --profiler # also check the tracker against torch.profiler
    .venv/bin/python benchmarks/plan_accuracy.py --device gpu   # bf16 GPT-B/L configs on an accelerator
"""
from __future__ import annotations

import argparse
import time

from argen.launcher import plan as P
from argen.model.gpt import GPTConfig, gpt_config

# (label, GPTConfig kwargs, micro-batch, checkpointing, precision)
CPU_CASES = [
    ("2L d128 V1024", dict(n_layer=2, n_head=4, dim=128, vocab_size=1024), 4, 0, "fp32"),
    ("1L d384 V256", dict(n_layer=1, n_head=8, dim=384, vocab_size=256), 4, 0, "fp32"),
    ("4L d256 V4096", dict(n_layer=4, n_head=4, dim=256, vocab_size=4096), 8, 0, "fp32"),
    ("4L d256 V4096 ckpt full", dict(n_layer=4, n_head=4, dim=256, vocab_size=4096), 8, 1, "fp32"),
    ("6L d384 V1024", dict(n_layer=6, n_head=8, dim=384, vocab_size=1024), 4, 0, "fp32"),
    ("6L d384 V1024 ckpt full", dict(n_layer=6, n_head=8, dim=384, vocab_size=1024), 4, 1, "fp32"),
    ("6L d384 V1024 ckpt every-2", dict(n_layer=6, n_head=8, dim=384, vocab_size=1024), 4, 2, "fp32"),
    ("6L d384 V16384 b1 (optimizer peak)", dict(n_layer=6, n_head=8, dim=384, vocab_size=16384), 1, 0, "fp32"),
    ("4L d256 V4096 bf16", dict(n_layer=4, n_head=4, dim=256, vocab_size=4096), 8, 0, "bf16"),
    ("4L d256 V4096 bf16 ckpt full", dict(n_layer=4, n_head=4, dim=256, vocab_size=4096), 8, 1, "bf16"),
    ("t2i 2L d128 prefix 120", dict(n_layer=2, n_head=4, dim=128, vocab_size=1024, model_type="t2i",
                                     cls_token_num=120, caption_len=120), 4, 0, "fp32"),
]
QUICK = [0, 3, 10]


def run_case(cfg: GPTConfig, batch: int, ckpt: int, precision: str, device: str, engine: str, torch_device=None):
    t0 = time.perf_counter()
    measured = P.measure_training_step(cfg, batch, checkpointing=ckpt, precision=precision, device=torch_device)
    wall = time.perf_counter() - t0
    s = P.Settings(micro_batch=batch, global_batch=batch, precision=precision,  # type: ignore[arg-type]
                   checkpointing=ckpt, device=device, engine=engine)  # type: ignore[arg-type]
    est = P.estimate(cfg, P.Layout(), s)
    return measured, est, wall


def profiler_check(cfg: GPTConfig, batch: int) -> tuple[int, int]:
    """Peak above the starting point from torch.profiler's allocator events vs from the live-tensor tracker."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from argen.model.gpt import GPT, gpt_loss
    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    codes = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size))
    labels = torch.randint(0, cfg.num_classes, (batch,))

    def step():
        gpt_loss(model(codes, labels), codes).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    tracked = P.measure_training_step(cfg, batch, precision="fp32")
    return peak, tracked["peak"] - tracked["base"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="three small CPU configs")
    ap.add_argument("--profiler", action="store_true", help="cross-check the tracker with torch.profiler")
    ap.add_argument("--device", choices=["cpu", "gpu"], default="cpu")
    args = ap.parse_args()

    if args.device == "gpu":
        from argen import device as dev
        if not dev.accelerator_available():
            raise SystemExit("--device gpu: no accelerator here")
        torch_device = dev.default_device()
        cases = [(f"{n} b{b} {'ckpt ' if ck else ''}bf16", gpt_config(n), b, ck, "bf16")
                 for n, b, ck in (("GPT-B", 32, 0), ("GPT-B", 64, 1), ("GPT-L", 16, 0), ("GPT-L", 32, 1))]
        planner = ("gpu", "torch")
    else:
        torch_device = None
        chosen = [CPU_CASES[i] for i in QUICK] if args.quick else CPU_CASES
        cases = [(label, GPTConfig(block_size=256, **kw), b, ck, prec) for label, kw, b, ck, prec in chosen]
        planner = ("cpu", "torch")

    print(f"{'config':<38} {'measured MiB':>13} {'argen MiB':>10} {'ratio':>7} {'error':>7}  peak predicted at"
          f"{'':<20} wall")
    worst = 0.0
    for label, cfg, b, ck, prec in cases:
        measured, est, wall = run_case(cfg, b, ck, prec, *planner, torch_device=torch_device)
        m = measured["peak"]
        err = (est.total - m) / m
        worst = max(worst, abs(err))
        print(f"{label:<38} {m / 2**20:>13.2f} {est.total / 2**20:>10.2f} {est.total / m:>7.4f} {err:>+7.2%}  "
              f"{est.moment:<36} {wall:.1f}s", flush=True)
    print(f"\nlargest |error|: {worst:.2%} over {len(cases)} configs (target <= 15%)")
    if args.profiler:
        cfg = GPTConfig(block_size=256, **CPU_CASES[0][1])
        prof_peak, tracked = profiler_check(cfg, CPU_CASES[0][2])
        print(f"instrument check ({CPU_CASES[0][0]}): torch.profiler allocator peak above start "
              f"{prof_peak / 2**20:.3f} MiB, live-tensor tracker {tracked / 2**20:.3f} MiB "
              f"(ratio {tracked / prof_peak:.5f})")


if __name__ == "__main__":
    main()
