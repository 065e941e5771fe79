"""Tokenizer evaluation input: encode and decode every image of a batch with a VQ export, keeping the order, so
`argen eval score RECON.npz ORIG.npz --paired` gives rFID, PSNR and SSIM against the originals.

Pixels: uint8 → [-1, 1] as x/127.5 − 1, reconstructions back with the reference's uint8(clamp(127.5·x + 128)).
The reference's rFID uses the ImageNet-val 50k npz as the reference set (not the ADM train statistics): name the
set you use, and shuffle it once if you also read IS from it (IS is taken over splits in file order).
"""
from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm.auto import tqdm

from argen import device as dev
from argen.errors import ArgenError
from argen.eval.npz import NpzImages, npz_writer, sidecar_path
from argen.eval.sample import to_uint8


@torch.inference_mode()
def reconstruct(vq_dir: str | Path, images: str | Path, out: str | Path, *, batch_size: int = 32,
                device=None, vq=None, limit: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """Write OUT.npz with the VQ reconstructions of IMAGES.npz (same order and size; only the first `limit` images
    when given) and OUT.json beside it. `vq`: a model already loaded (vq_dir then only names it); `dtype`: autocast
    precision (None: fp32)."""
    from argen.model import load
    device = device or dev.default_device()
    vq = vq or load(vq_dir, device=device)
    if vq.kind != "vq":
        raise ArgenError(f"{vq_dir} holds a '{vq.kind}' model, not a VQ tokenizer")
    src = NpzImages(images)
    f = vq.config.downsample
    if src.shape[1] % f or src.shape[2] % f:
        raise ArgenError(f"{images}: image size {src.shape[1:3]} is not a multiple of the VQ downsampling {f}")
    out = Path(out)
    n = len(src) if limit is None else min(limit, len(src))
    start = time.time()
    with npz_writer(out, (n, *src.shape[1:])) as write:
        for batch in tqdm(src.batches(batch_size, n), total=-(-n // batch_size), desc="reconstructing",
                          unit="batch", disable=None):
            x = torch.from_numpy(batch.copy()).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            with dev.autocast(device, dtype):
                codes = vq.encode(x)
                recon = vq.decode(codes).float()
            write(to_uint8(recon, None, "none"))
    record = {"format": "argen-reconstructions-1", "vq": {"path": str(vq_dir), "name": vq.config.name},
              "source": {"path": str(images), "num_images": n, "image_size": list(src.shape[1:3])},
              "seconds": round(time.time() - start, 2), "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    sidecar_path(out).write_text(json.dumps(record, indent=2))
    return record
