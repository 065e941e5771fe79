"""Offline tokenization: the reference's layout vs argen, same VQ, same images, same 20 code grids per image.

Baseline = LlamaGen extract_codes_c2i.py as published: ImageFolder, batch size 1 (the 10 crops of one image per VQ
forward), one run per crop range (the released recipe runs it at 1.1 and at 1.05), and per image one int64
`codes/{i}.npy` of shape (1, 10, T) plus one `labels/{i}.npy`.
argen = `argen tokenize` (TokenizeJob): one pass decodes each image once for both crop ranges, encodes crops of
several images per forward, writes uint16 codes into zstd WebDataset shards (the default) with a manifest.

Both use the same crop code (argen.tokenize_offline.images, which reproduces center_crop_arr + TenCrop), the same
decoding workers and the same torch thread count, each in its own child process (argen's job sets process-wide
allocator thresholds the reference must not inherit). The script checks that both produce the same codes (up to
argmin near-ties that batch-size-dependent float rounding flips). Two last lines time argen's VQ forwards alone,
over as many random crops of the same shape at argen's batching (the ceiling for any pipeline around this VQ at
this precision and thread count), and set their FLOP rate beside one large convolution's.

CPU only (GPUs are hidden): the target is set on the CPU, and the reference side and the ceiling run there.

    .venv/bin/python benchmarks/tokenize_throughput.py                      # VQ-tiny (the demo VQ), 64 px
    .venv/bin/python benchmarks/tokenize_throughput.py --vq VQ-micro --image-size 16 --images 400
    .venv/bin/python benchmarks/tokenize_throughput.py --vq path/to/vq-export --image-size 256
"""
from __future__ import annotations

import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch: argen's job would otherwise encode on a GPU, the reference not

import argparse
import concurrent.futures
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import argen.model as M
from argen.config import load_config
from argen.data_pipeline import shard_format as sf
from argen.data_pipeline.synthetic import synthetic_image
from argen.model.vq import VQ_SIZES, VQModel
from argen.tokenize_offline import images as im
from argen.tokenize_offline.config import TokenizeConfig
from argen.tokenize_offline.job import Part, TokenizeJob


def make_images(root: Path, n: int, size: int) -> list[tuple[str, int]]:
    files = []
    for i in range(n):
        cls = f"n{i % 10:08d}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        p = root / cls / f"img{i:06d}.jpg"
        # non-square, larger than the crop: every image goes through the BOX/BICUBIC resize like ImageNet photos
        synthetic_image(i, size, seed=3).resize((size + size // 3, size)).save(p, quality=90)
    for label, cls in enumerate(sorted(os.listdir(root))):
        files += [(str(root / cls / f), label) for f in sorted(os.listdir(root / cls))]
    return files


class RefDataset(torch.utils.data.Dataset):
    """ImageFolder + the reference transform for one crop range: (10, 3, S, S) floats, label."""

    def __init__(self, files, image_size, crop_range):
        self.files, self.size, self.range = files, image_size, crop_range

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.files[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        crops = im.augment(img, self.size, "ten_crop", [self.range])
        return im.to_model_input(crops), label


def cpu_seconds() -> float:
    """User+system CPU of this process and its reaped children (decode workers): robust to a loaded machine."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def in_fresh_process(fn, *args, threads: int):
    """Run fn(*args) in a child process: argen's job tunes process-wide state (the glibc allocator) that the
    reference, run in the same process afterwards, would otherwise inherit. Forked, not spawned: a spawned child
    would start its own decode workers by spawning too (a torch import each), which neither side does for real."""
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx, initializer=torch.set_num_threads,
                                                initargs=(threads,)) as pool:
        return pool.submit(fn, *args).result()


def run_reference(files, vq_dir: str, image_size, ranges, out: Path, workers: int) -> tuple[float, float]:
    vq = M.load(vq_dir)
    t0, c0 = time.perf_counter(), cpu_seconds()
    for r in ranges:  # the released recipe: one full extraction run per crop range
        run_dir = out / f"imagenet_code_c2i_flip_ten_crop_{r:g}"
        (run_dir / f"imagenet{image_size}_codes").mkdir(parents=True)
        (run_dir / f"imagenet{image_size}_labels").mkdir(parents=True)
        loader = torch.utils.data.DataLoader(RefDataset(files, image_size, r), batch_size=1, shuffle=False,
                                             num_workers=workers, drop_last=False)
        for i, (x, y) in enumerate(loader):
            with torch.no_grad():
                idx = vq.encode(x.flatten(0, 1))
            codes = idx.reshape(x.shape[0], x.shape[1], -1).cpu().numpy()        # (1, 10, T) int64
            np.save(run_dir / f"imagenet{image_size}_codes" / f"{i}.npy", codes)
            np.save(run_dir / f"imagenet{image_size}_labels" / f"{i}.npy", y.numpy())
    return time.perf_counter() - t0, cpu_seconds() - c0


def run_argen(root: Path, vq_dir: str, image_size: int, ranges, out: Path, workers: int, threads: int,
              crops_per_forward: int, compression: str, vq_dtype: str = "float32") -> tuple[float, float, sf.Manifest]:
    cfg = load_config(TokenizeConfig, None, [
        "source.kind=imagenet_folder", f"source.path={root}", f"vq.path={vq_dir}", f"output.url={out}",
        f"image_size={image_size}", f"augment.crop_ranges={list(ranges)}", f"num_workers={workers}",
        f"threads={threads}", f"vq.crops_per_forward={crops_per_forward}", f"output.compression={compression}",
        "images_per_batch=8", "output.samples_per_shard=1000", "progress=false", f"vq.dtype={vq_dtype}"])
    t0, c0 = time.perf_counter(), cpu_seconds()
    job = TokenizeJob(cfg, log=lambda m: None)
    job.run_part(Part(0, 1, "single"))
    m = job.finalize()
    return time.perf_counter() - t0, cpu_seconds() - c0, m


def run_vq_alone(vq_dir: str, n: int, image_size: int, grids: int, crops_per_forward: int,
                 vq_dtype: str) -> tuple[float, float, float, float]:
    """argen's VQ forwards alone over n images' crops (no decoding, no I/O): a ceiling on what any pipeline around
    this VQ, at this precision and thread count, can reach on this machine. Returns (seconds, FLOPs per crop, the
    convolutions' share of them, the FLOP/s of a large convolution at this thread count): how close the encoder
    runs to this machine's own convolution rate."""
    from torch.utils.flop_counter import FlopCounterMode

    from argen import device as dev
    from argen.tokenize_offline.job import auto_crops_per_forward, encode_crops

    dev.keep_freed_cpu_memory()
    vq = M.load(vq_dir).to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (grids, image_size, image_size, 3), dtype=np.uint8) for _ in range(n)]
    dtype = torch.bfloat16 if vq_dtype == "bfloat16" else None
    per_forward = crops_per_forward or auto_crops_per_forward(vq.config, image_size, None)  # argen's CPU choice
    encode_crops(vq, crops[:2], per_forward, "cpu", dtype, True)  # warm-up
    t0 = time.perf_counter()
    encode_crops(vq, crops, per_forward, "cpu", dtype, True)
    seconds = time.perf_counter() - t0
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        vq.encode(torch.zeros(1, 3, image_size, image_size))
    peak_rate = conv_rate(dtype or torch.float32)
    conv_share = counter.get_flop_counts()["Global"][torch.ops.aten.convolution] / counter.get_total_flops()
    return seconds, counter.get_total_flops(), conv_share, peak_rate


def conv_rate(dtype: torch.dtype) -> float:
    """FLOP/s of one large 3x3 convolution (256 channels, 32x32, batch 8, channels-last): the rate this machine's
    convolution kernels reach when the shapes are kind to them. (Not a matmul: torch's CPU matmul goes through MKL,
    which on AMD cores runs at half of what oneDNN's convolutions reach.)"""
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(dtype=dtype, memory_format=torch.channels_last)
    x = torch.randn(8, 256, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv(x)
        t0 = time.perf_counter()
        for _ in range(5):
            conv(x)
        return 5 * 2 * 8 * 32 * 32 * 256 * 256 * 9 / (time.perf_counter() - t0)


def tree_stats(path: Path) -> tuple[int, int, int]:
    """(files, bytes, bytes on disk)"""
    n = size = disk = 0
    for p in path.rglob("*"):
        if p.is_file():
            st = p.stat()
            n, size, disk = n + 1, size + st.st_size, disk + st.st_blocks * 512
    return n, size, disk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vq", default="VQ-tiny", help="a VQ_SIZES name (random init) or an argen VQ export directory")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--crop-ranges", type=float, nargs="+", default=[1.1, 1.05])
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--crops-per-forward", type=int, default=0, help="0: argen's auto choice (20 on CPU)")
    ap.add_argument("--vq-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="argen's VQ precision (the reference is fp32; bf16 changes codes at near-ties)")
    ap.add_argument("--repeats", type=int, default=2, help="alternate baseline/argen this many times; best of each")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args()
    # The parent stays single-threaded: a forked child of a process whose OpenMP pool has started (any op run with
    # more than one thread) hangs in its first parallel region. The children set --threads themselves.
    torch.set_num_threads(1)

    work = Path(args.workdir or tempfile.mkdtemp(prefix="argen-tok-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.vq in VQ_SIZES:
        torch.manual_seed(0)
        vq_dir = str(work / "vq")
        M.save(VQModel(VQ_SIZES[args.vq]), vq_dir)
    else:
        vq_dir = args.vq
    vq = M.load(vq_dir)
    files = make_images(work / "train", args.images, int(args.image_size * max(args.crop_ranges)) + 16)
    n = len(files)
    print(f"{n} JPEG images, VQ {args.vq} (codebook {vq.codebook_size}, /{vq.downsample}), {args.image_size} px, "
          f"ten-crop x {args.crop_ranges} = {10 * len(args.crop_ranges)} code grids per image; "
          f"{args.workers} decode workers, {args.threads} torch threads, {os.cpu_count()} CPUs")

    best_ref = best_argen = cpu_ref = cpu_argen = float("inf")
    for rep in range(args.repeats):
        ref_out = work / f"ref{rep}"
        t, c = in_fresh_process(run_reference, files, vq_dir, args.image_size, args.crop_ranges, ref_out,
                                args.workers, threads=args.threads)
        best_ref, cpu_ref = min(best_ref, t), min(cpu_ref, c)
        arg_out = work / f"argen{rep}"
        t, c, m = in_fresh_process(run_argen, work / "train", vq_dir, args.image_size, args.crop_ranges, arg_out,
                                   args.workers, args.threads, args.crops_per_forward, "zstd", args.vq_dtype,
                                   threads=args.threads)
        best_argen, cpu_argen = min(best_argen, t), min(cpu_argen, c)
    vq_alone, flops_per_crop, conv_share, peak_rate = min(
        in_fresh_process(run_vq_alone, vq_dir, n, args.image_size, 10 * len(args.crop_ranges),
                         args.crops_per_forward, args.vq_dtype, threads=args.threads)
        for _ in range(args.repeats))
    in_fresh_process(run_argen, work / "train", vq_dir, args.image_size, args.crop_ranges, work / "argen-plain",
                     args.workers, args.threads, args.crops_per_forward, "none", threads=args.threads)

    # same work: argen's 20 rows are the reference's two runs side by side. Codes agree up to near-ties of the
    # argmin, which batch-size-dependent float rounding in the conv kernels can flip (bs 10 vs bs N).
    _, samples = sf.read_dataset(str(work / "argen0"))
    checked = same = total = 0
    for s in samples:
        runs = [np.load(work / "ref0" / f"imagenet_code_c2i_flip_ten_crop_{r:g}" / f"imagenet{args.image_size}_codes"
                        / f"{s.index}.npy") for r in args.crop_ranges]
        ref = np.concatenate([x[0] for x in runs])
        assert ref.shape == s.codes.shape, (ref.shape, s.codes.shape)
        same += int((ref == s.codes.astype(np.int64)).sum())
        total += ref.size
        checked += 1
    assert checked == n
    agreement = same / total
    if args.vq_dtype == "float32":
        assert agreement > 0.99, f"only {agreement:.4%} of the codes agree: not the same computation"
    rf, rb, rd = tree_stats(work / "ref0")
    af, ab, ad = tree_stats(work / "argen0")
    pf, pb, pd = tree_stats(work / "argen-plain")
    why = ("argmin near-ties flipped by batch-size-dependent conv rounding" if args.vq_dtype == "float32"
           else "bf16 rounding moves latents across code boundaries")
    print(f"codes agree at {agreement:.4%} of {total} positions over {checked} images (the rest: {why})\n")
    print(f"{'':28s}{'images/s':>10s}{'img/cpu-s':>10s}{'files':>8s}{'bytes':>12s}{'on disk':>12s}")
    print(f"{'reference layout (bs 1)':28s}{n / best_ref:10.3g}{n / cpu_ref:10.3g}{rf:8d}{rb:12d}{rd:12d}")
    print(f"{'argen (zstd shards)':28s}{n / best_argen:10.3g}{n / cpu_argen:10.3g}{af:8d}{ab:12d}{ad:12d}")
    print(f"{'argen (plain tar shards)':28s}{'':20s}{pf:8d}{pb:12d}{pd:12d}")
    print(f"\nratio argen/reference: images/s x{best_ref / best_argen:.2f} (per CPU-second x{cpu_ref / cpu_argen:.2f}), "
          f"bytes {ab / rb:.3f} "
          f"(plain tar {pb / rb:.3f}), on disk {ad / rd:.3f}, files {af}/{rf} "
          f"({len(m.shards)} shard + manifest vs 2 per image per crop range)")
    print(f"VQ forwards alone (argen's batching, no decoding or I/O): {n / vq_alone:.3g} images/s, so no pipeline "
          f"around this VQ at {args.vq_dtype} and {args.threads} thread(s) exceeds x{best_ref / vq_alone:.2f} the "
          f"reference here")
    encoder_rate = n * 10 * len(args.crop_ranges) * flops_per_crop / vq_alone
    print(f"  those forwards do {flops_per_crop / 1e9:.3g} GFLOP per crop ({conv_share:.0%} convolutions) at "
          f"{encoder_rate / 1e9:.0f} GFLOP/s, {encoder_rate / peak_rate:.0%} of one large {args.vq_dtype} 3x3 "
          f"convolution here ({peak_rate / 1e9:.0f} GFLOP/s)")
    worst_case_bytes(work / "worst-case")


def worst_case_bytes(out: Path) -> None:
    """Bytes per sample when the codes are incompressible (uniform over a 16384 codebook: a trained VQ-16 on
    real photos is close to this); a random-init demo VQ uses few codes and flatters compression."""
    rng = np.random.default_rng(0)
    print("\nincompressible codes (uniform over 16384), 20 grids + label per image, 1000 images:")
    for size, grid in ((256, 16), (384, 24)):
        ref = 2 * ((128 + 10 * grid * grid * 8) + (128 + 8))  # per crop range: (1,10,T) int64 .npy + (1,) label .npy
        row = [f"  {size} px ({grid}x{grid}): reference {ref} B/image"]
        for comp in ("zstd", "gzip", "none"):
            with sf.ShardWriter(str(out / f"{size}-{comp}"), 0, compression=comp) as w:
                for i in range(1000):
                    w.write(sf.encode_sample(i, rng.integers(0, 16384, (20, grid * grid)), label=i % 1000))
                info = w.commit()
            row.append(f"argen {comp} {info.bytes / 1000:.0f} B/image ({info.bytes / 1000 / ref:.3f})")
        print(", ".join(row))


if __name__ == "__main__":
    main()
