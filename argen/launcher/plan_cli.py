"""`argen plan`: per-GPU memory of a training layout, or the layouts of N GPUs that fit, best first.

    argen plan --model GPT-3B --gpus 64                      # suggest layouts for 64 x 80 GiB GPUs
    argen plan --model GPT-3B --gpus 64 --tp 2 --zero 1      # one layout: a table per component and ZeRO stage
    argen plan --model GPT-XL --model-type t2i --image-size 512 --dp 8 --micro-batch 8 --activation-checkpointing full
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace

from argen.errors import ArgenError
from argen.launcher import plan as P
from argen.model.gpt import GPT_SIZES

COMPONENTS = ["parameters", "gradients", "optimizer states", "ZeRO buffers", "batch and buffers", "activations",
              "transient"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="argen plan",
        description="Predict per-GPU memory (parameters, gradients, AdamW states under ZeRO 0/1/2/3, activations "
                    "with and without checkpointing) of a tp x pp x dp layout, or, with --gpus alone, list the "
                    "layouts that fit, ranked by expected throughput. The formulas are in the README, 'argen plan'.",
        epilog="examples:\n  argen plan --model GPT-3B --gpus 64\n"
               "  argen plan --model GPT-3B --gpus 64 --tp 2 --zero 1 --micro-batch 4\n"
               "  argen plan --model GPT-XL --model-type t2i --image-size 512 --dp 8 --activation-checkpointing full",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", default="GPT-B", metavar="NAME",
                   help=f"zoo name ({', '.join(GPT_SIZES)}) or 'custom' with --n-layer/--n-head/--dim (default GPT-B)")
    m.add_argument("--model-type", choices=["c2i", "t2i"], default="c2i",
                   help="class- or text-conditional (default c2i)")
    m.add_argument("--image-size", type=int, default=256,
                   help="pixels; 16x downsampling gives the token grid (default 256)")
    m.add_argument("--seq", type=int, default=None,
                   help="image tokens per sample (a square: 256, 576, 1024) or the training sequence length; "
                        "overrides --image-size")
    m.add_argument("--n-layer", type=int, help="override the number of blocks")
    m.add_argument("--n-head", type=int, help="override the number of heads")
    m.add_argument("--dim", type=int, help="override the width")
    m.add_argument("--vocab-size", type=int, help="override the codebook size (default 16384)")
    lay = ap.add_argument_group("layout (give any of these for a single layout; --gpus alone suggests layouts)")
    lay.add_argument("--gpus", type=int, help="total GPUs = tp * pp * dp")
    lay.add_argument("--tp", type=int, help="tensor-parallel size (default 1)")
    lay.add_argument("--pp", type=int, help="pipeline stages (default 1)")
    lay.add_argument("--dp", type=int, help="data-parallel size (default gpus / (tp * pp), or 1)")
    lay.add_argument("--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage to mark (all four are shown)")
    run = ap.add_argument_group("training")
    run.add_argument("--micro-batch", type=int, help="samples per rank per forward (default: global batch / dp, "
                                                      "suggestions: the largest power of two that fits)")
    run.add_argument("--global-batch", type=int, default=256, help="samples per optimizer step (default 256)")
    run.add_argument("--activation-checkpointing", default="off", metavar="off|full|every-N",
                     help="recompute no block, every block, or blocks 0, N, 2N, ... (default off)")
    run.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                     help="bf16: bf16 params/grads/activations, fp32 master + AdamW moments (default)")
    run.add_argument("--attention", choices=["flash", "math"], default="flash",
                     help="flash: flash-attn / SDPA flash or memory-efficient, nothing S x S kept (default); "
                          "math: SDPA's math backend keeps the S x S probabilities")
    hw = ap.add_argument_group("hardware and output")
    hw.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    hw.add_argument("--headroom", type=float, default=P.DEFAULT_HEADROOM,
                    help="fraction kept free for the CUDA context, NCCL and fragmentation (default 0.1)")
    hw.add_argument("--gpus-per-node", type=int, default=8, help="tp stays within a node (default 8)")
    hw.add_argument("--top", type=int, default=10, help="suggestions to print (default 10)")
    hw.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return ap


def _gib(n: int) -> str:
    return f"{n / P.GiB:.2f}"


def _model_line(cfg, name: str) -> str:
    return (f"{name} {cfg.model_type} grid {cfg.grid}x{cfg.grid}: {P.total_params(cfg):,} parameters, "
            f"{cfg.n_layer} blocks, dim {cfg.dim}, {cfg.n_head} heads, FFN {cfg.ffn_hidden}, "
            f"sequence {cfg.seq_len}, vocab {cfg.vocab_size}")


def _settings_line(s: P.Settings, est: P.Estimate) -> str:
    return (f"micro-batch {s.micro_batch} x {est.micro_batches} accumulation steps (global {s.global_batch}), "
            f"{s.precision}, checkpointing {P.checkpointing_name(s.checkpointing)}, {s.attention} attention")


def layout_table(cfg, layout: P.Layout, s: P.Settings, gpu_mem: float, headroom: float) -> tuple[str, dict]:
    usable = gpu_mem * (1 - headroom)
    cols: dict[int, P.Estimate | None] = {}
    for z in range(4):
        lz = replace(layout, zero=z)
        cols[z] = None if (layout.pp > 1 and z > 1) else P.estimate(cfg, lz, s)
    head = f"{'per GPU, GiB':<20}" + "".join(
        f"{('*' if z == layout.zero else '') + f'ZeRO-{z}':>10}" for z in range(4))
    lines = [head]
    for comp in COMPONENTS:
        row = f"{comp:<20}"
        for z in range(4):
            e = cols[z]
            row += f"{(_gib(e.components[comp]) if e else 'n/a'):>10}"
        lines.append(row)
    lines.append(f"{'total (peak)':<20}" + "".join(f"{(_gib(e.total) if e else 'n/a'):>10}" for e in cols.values()))
    lines.append(f"{f'fits {gpu_mem:g} GiB':<20}" + "".join(
        f"{(('yes' if e.fits(gpu_mem, headroom) else 'NO') if e else '-'):>10}" for e in cols.values()))
    chosen = cols[layout.zero]
    assert chosen is not None
    moments = "; ".join(f"ZeRO-{z}: {e.moment}" for z, e in cols.items() if e)
    full = P.layer_activation_bytes(cfg, s.micro_batch, layout.tp, s)
    ck = P.checkpointed_layer_bytes(cfg, s.micro_batch, s)
    text = "\n".join([
        f"layout {layout} ({layout.world_size} GPUs), " + _settings_line(s, chosen),
        f"heaviest pipeline stage: {chosen.stage} (holds {chosen.in_flight} micro-batch(es) of activations)",
        "",
        *lines,
        "",
        f"peak at: {moments}",
        f"activations per micro-batch on that stage: {_gib(chosen.activations_per_micro_batch)} GiB "
        f"(per block {full / 2**20:.1f} MiB, {ck / 2**20:.1f} MiB if recomputed; "
        f"fp32 logits {P.logits_bytes(cfg, s.micro_batch, layout.tp) / 2**20:.1f} MiB per copy)",
        f"usable memory: {usable:.1f} of {gpu_mem:g} GiB ({headroom:.0%} headroom)",
    ] + chosen.notes)
    data = {"layout": asdict(layout), "settings": asdict(s),
            "zero": {z: ({"components": e.components, "total": e.total, "moment": e.moment,
                          "fits": e.fits(gpu_mem, headroom)} if e else None) for z, e in cols.items()}}
    return text, data


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt = P.parse_checkpointing(args.activation_checkpointing)
    for key in ("gpus", "tp", "pp", "dp", "micro_batch", "global_batch"):
        v = getattr(args, key)
        if v is not None and v < 1:
            raise ArgenError(f"--{key.replace('_', '-')} must be >= 1, got {v}")
    if args.gpu_mem <= 0 or not 0 <= args.headroom < 1:
        raise ArgenError("--gpu-mem must be > 0 and --headroom in [0, 1)")
    cfg = P.model_config(args.model, image_size=args.image_size, model_type=args.model_type, seq=args.seq,
                         n_layer=args.n_layer, n_head=args.n_head, dim=args.dim, vocab_size=args.vocab_size)
    base = P.Settings(micro_batch=args.micro_batch or 1, global_batch=args.global_batch, precision=args.precision,
                      checkpointing=ckpt, attention=args.attention)
    single = any(getattr(args, k) is not None for k in ("tp", "pp", "dp", "zero"))

    if not single and args.gpus is not None:
        return _suggest(cfg, args, base)

    tp, pp = args.tp or 1, args.pp or 1
    if args.gpus is not None:
        if args.gpus % (tp * pp):
            raise ArgenError(f"{args.gpus} GPUs are not divisible by tp*pp = {tp}*{pp} = {tp * pp}")
        dp = args.gpus // (tp * pp)
        if args.dp is not None and args.dp != dp:
            raise ArgenError(f"--dp {args.dp} disagrees with --gpus {args.gpus} / (tp*pp = {tp * pp}) = {dp}")
    else:
        dp = args.dp or 1
    layout = P.Layout(tp=tp, pp=pp, dp=dp, zero=args.zero if args.zero is not None else 0)
    P.check_layout(cfg, layout)
    if args.global_batch % dp:
        raise ArgenError(f"global batch {args.global_batch} is not divisible by dp={dp}")
    mb = args.micro_batch or args.global_batch // dp
    s = replace(base, micro_batch=mb)
    P.check_layout(cfg, layout, s)
    text, data = layout_table(cfg, layout, s, args.gpu_mem, args.headroom)
    if args.json:
        print(json.dumps({"model": _model_line(cfg, args.model), **data}, indent=1))
    else:
        print(_model_line(cfg, args.model))
        print(text)
    return 0


def _suggest(cfg, args, base: P.Settings) -> int:
    sugg = P.suggest(cfg, args.gpus, args.gpu_mem, base, headroom=args.headroom,
                     gpus_per_node=args.gpus_per_node, micro_batch=args.micro_batch)
    usable = args.gpu_mem * (1 - args.headroom)
    if args.json:
        print(json.dumps({"model": _model_line(cfg, args.model), "gpus": args.gpus, "gpu_mem_gib": args.gpu_mem,
                          "suggestions": [{"layout": asdict(sg.layout), "micro_batch": sg.estimate.settings.micro_batch,
                                           "checkpointing": P.checkpointing_name(sg.estimate.settings.checkpointing),
                                           "peak_bytes": sg.estimate.total, "score": round(sg.score, 4)}
                                          for sg in sugg[: args.top]], "fitting": len(sugg)}, indent=1))
        return 0 if sugg else 1
    print(_model_line(cfg, args.model))
    print(f"{args.gpus} GPUs x {args.gpu_mem:g} GiB ({usable:.1f} GiB usable), global batch {args.global_batch}, "
          f"{args.precision}; tp <= {args.gpus_per_node} within a node")
    if not sugg:
        print(f"no layout of {args.gpus} GPUs fits: try more GPUs, a smaller --global-batch or a larger --gpu-mem")
        return 1
    print()
    print(f"{'#':>3} {'tp':>3} {'pp':>3} {'dp':>4} {'zero':>5} {'ckpt':>9} {'micro':>6} {'accum':>6} "
          f"{'peak GiB':>9} {'score':>6}")
    for i, sg in enumerate(sugg[: args.top], 1):
        lt, st, e = sg.layout, sg.estimate.settings, sg.estimate
        print(f"{i:>3} {lt.tp:>3} {lt.pp:>3} {lt.dp:>4} {lt.zero:>5} {P.checkpointing_name(st.checkpointing):>9} "
              f"{st.micro_batch:>6} {e.micro_batches:>6} {e.total / P.GiB:>9.2f} {sg.score:>6.3f}")
    print(f"\n{len(sugg)} layouts fit (showing {min(args.top, len(sugg))}). score = expected relative throughput: "
          "recompute, pipeline bubble, tp communication, ZeRO-3 gathers and micro-batch size (README, 'argen plan').")
    best = sugg[0]
    print("\nbest layout in detail:")
    text, _ = layout_table(cfg, best.layout, best.estimate.settings, args.gpu_mem, args.headroom)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
