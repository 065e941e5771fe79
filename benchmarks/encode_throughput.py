"""VQ-16 encoding throughput at 256 px: one image per call (LlamaGen's extract_codes_c2i.py, batch size 1) vs batched.

    .venv/bin/python benchmarks/encode_throughput.py --images 8 --batch 2 --threads 1  [--bf16]

Both sides use the same randomly initialised VQ-16 (weights do not change the cost) in fp32 on the default device
(CPU here; a GPU when one is present), inference mode, after one warm-up call each. The argen side batches and, unless
--no-channels-last, runs the model in channels-last memory format (oneDNN's preferred layout for convolutions on CPU),
and on a CPU keeps freed blocks in the heap (argen.device.keep_freed_cpu_memory) as `argen tokenize` does.
The codes of the two paths are compared and the fraction that differs is printed, so a speed-up is never bought with
unreported changes in the result. Prints baseline, argen and the ratio.
"""
from __future__ import annotations

import argparse
import time

import torch

from argen import device as dev
from argen.model.vq import VQ_SIZES, VQModel


def _time(fn, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds): on a shared CPU the CPU time of a 1-thread run is the fair figure."""
    dev.synchronize(device)
    t, c = time.perf_counter(), time.process_time()
    fn()
    dev.synchronize(device)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="VQ-16", choices=sorted(VQ_SIZES))
    ap.add_argument("--images", type=int, default=8, help="images encoded by each side")
    ap.add_argument("--batch", type=int, default=2, help="argen's batch size")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--bf16", action="store_true", help="argen side under bf16 autocast (codes may differ)")
    ap.add_argument("--no-channels-last", action="store_true", help="argen side in the default NCHW layout")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = dev.default_device()
    torch.manual_seed(0)
    model = VQModel(VQ_SIZES[args.model]).to(device).eval()
    images = torch.rand(args.images, 3, args.size, args.size, device=device) * 2 - 1
    print(f"{args.model} encode at {args.size} px on {device} ({torch.get_num_threads()} CPU threads), "
          f"{args.images} images")

    with torch.inference_mode():
        model.encode(images[:1])  # warm-up
        codes_one: list[torch.Tensor] = []
        t_one = _time(lambda: codes_one.extend(model.encode(images[i:i + 1]) for i in range(args.images)), device)
        dtype = torch.bfloat16 if args.bf16 else None
        if not dev.is_accelerator(device):
            dev.keep_freed_cpu_memory()  # as a CPU tokenize part does; after the baseline, which must not get it
        if not args.no_channels_last:
            model = model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)
        with dev.autocast(device, dtype):
            model.encode(images[:args.batch])  # warm-up at the batched shape
        codes_b: list[torch.Tensor] = []

        def batched():
            with dev.autocast(device, dtype):
                for i in range(0, args.images, args.batch):
                    codes_b.append(model.encode(images[i:i + args.batch]))
        t_b = _time(batched, device)
    differ = float((torch.cat(codes_one) != torch.cat(codes_b)).float().mean())
    how = f"batch {args.batch}" + ("" if args.no_channels_last else ", channels-last") + (", bf16" if args.bf16 else "")
    for i, clock in enumerate(("wall", "CPU-time")):
        base, ours = args.images / t_one[i], args.images / t_b[i]
        print(f"[{clock}] baseline (1 image per call, NCHW fp32): {base:8.3f} images/s | argen ({how}): "
              f"{ours:8.3f} images/s | ratio {ours / base:.2f}x")
    print(f"codes differing between the two paths: {differ:.2%}")


if __name__ == "__main__":
    main()
