"""Generate a sample batch (`.npz`, `arr_0` = N×H×W×3 uint8) from a GPT export across all ranks.

Two protocols, recorded with every batch in `OUT.json`:
- ``reference``: LlamaGen's sample_c2i_ddp. Each rank seeds its global RNG with seed·world + rank, draws uniform
  random labels per batch, and its i-th image of step s lands at position s·B·world + i·world + rank. Results depend
  on the number of ranks, exactly like the published numbers. Not resumable (the RNG stream cannot be skipped).
- ``balanced``: labels i % num_classes for sample index i, and global batch b (indices b·B … b·B+B−1) sampled with
  its own seed derived from (seed, b). Any number of ranks produces the same images for the same --batch-size, and
  an interrupted run resumes: finished batches are kept under OUT.npz.parts/.

Pixels follow the reference: decode in fp32, optional bicubic resize to --image-size-eval on the float output
(no antialias unless --resize bicubic-aa), then uint8(clamp(127.5·x + 128, 0, 255)).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from argen import device as dev
from argen.errors import ArgenError
from argen.eval import EVALUATOR_VERSION
from argen.eval.npz import npz_writer, sidecar_path
from argen.model import pixels

# cfg used for the published FID of each size (LlamaGen's README and `sample_c2i_ddp.py` commands); other models
# fall back to the DDP default 1.5.
REFERENCE_CFG = {"GPT-B": 2.0, "GPT-L": 2.0, "GPT-XL": 1.75, "GPT-XXL": 1.75, "GPT-3B": 1.65}
DEFAULT_CFG = 1.5
RESIZE_MODES = ("bicubic", "bicubic-aa", "none")


@dataclass
class SampleProtocol:
    protocol: str = "balanced"          # "reference" | "balanced"
    num: int = 50000
    batch_size: int = 32                # per rank and step; part of the balanced protocol's identity
    cfg_scale: float | None = None      # None: the published value for the model size
    cfg_schedule: str | None = None     # None/constant, linear, or an int cfg interval
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    image_size_eval: int | None = 256   # None: keep the generated size
    resize: str = "bicubic"
    precision: str = "auto"             # auto (bf16 on an accelerator, fp32 on CPU) | bf16 | fp32

    def validate(self) -> None:
        if self.protocol not in ("reference", "balanced"):
            raise ArgenError(f"--protocol must be 'reference' or 'balanced', got '{self.protocol}'")
        if self.num < 1 or self.batch_size < 1:
            raise ArgenError(f"--num and --batch-size must be positive, got {self.num} and {self.batch_size}")
        if self.resize not in RESIZE_MODES:
            raise ArgenError(f"--resize must be one of {RESIZE_MODES}, got '{self.resize}'")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ArgenError(f"--precision must be auto, bf16 or fp32, got '{self.precision}'")
        if not 0 < self.top_p <= 1 or self.top_k < 0 or self.temperature <= 0:
            raise ArgenError(f"bad sampling settings: top_k={self.top_k}, top_p={self.top_p}, "
                             f"temperature={self.temperature}")


def to_uint8(images: torch.Tensor, size: int | None, resize: str) -> np.ndarray:
    """Decoder output in [-1, 1] (B, 3, H, W) -> uint8 (B, size, size, 3), the reference's conversion."""
    x = images.float()
    if size is not None and resize != "none" and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=(resize == "bicubic-aa"))
    return pixels.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()


def batch_seed(seed: int, batch_index: int) -> int:
    return int(np.random.SeedSequence([seed, batch_index]).generate_state(1, np.uint64)[0] >> 1)


def _captions(path: str | None, model) -> dict | None:
    if model.config.model_type == "c2i":
        return None
    if not path:
        raise ArgenError("t2i models need --captions FILE.npz (features (M,T,D), optional mask (M,T) and prompts)")
    data = np.load(path)
    if "features" not in data.files:
        raise ArgenError(f"{path} has no 'features' array")
    return {"features": torch.from_numpy(data["features"].astype(np.float32)),
            "mask": torch.from_numpy(data["mask"]).bool() if "mask" in data.files else None,
            "path": str(path)}


def _condition(model, idx: np.ndarray, labels: torch.Tensor | None, captions: dict | None, device, dtype):
    if captions is None:
        return labels.to(device), None
    sel = torch.from_numpy(idx % len(captions["features"]))
    feats = captions["features"][sel].to(device=device, dtype=dtype or torch.float32)
    mask = None if captions["mask"] is None else captions["mask"][sel].to(device)
    return feats, mask


class Sampler:
    """Loads the GPT and VQ once; `run(proto, out)` writes one sample batch (reused by the watcher)."""

    def __init__(self, ckpt: str | Path, vq: str | Path, *, precision: str = "auto", device=None):
        from argen.model import load
        from argen.model.io import read_record
        self.device = device or dev.default_device()
        if precision == "auto":
            precision = "bf16" if dev.is_accelerator(self.device) else "fp32"
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else None
        self.ckpt, self.vq_path = str(ckpt), str(vq)
        self.record = read_record(ckpt)
        self.model = load(ckpt, device=self.device, dtype=self.dtype)
        if self.model.kind != "gpt":
            raise ArgenError(f"{ckpt} holds a '{self.model.kind}' model, not a GPT")
        self.vq = load(vq, device=self.device)  # the decoder runs in fp32 like the reference
        if self.vq.kind != "vq":
            raise ArgenError(f"{vq} holds a '{self.vq.kind}' model, not a VQ tokenizer")
        if self.vq.codebook_size < self.model.config.vocab_size:
            raise ArgenError(f"VQ codebook ({self.vq.codebook_size}) is smaller than the GPT vocabulary "
                             f"({self.model.config.vocab_size})")

    def resolved(self, proto: SampleProtocol) -> SampleProtocol:
        p = SampleProtocol(**asdict(proto))
        if p.cfg_scale is None:
            p.cfg_scale = REFERENCE_CFG.get(self.model.config.name, DEFAULT_CFG)
        p.precision = self.precision
        p.validate()
        return p

    def _images(self, p: SampleProtocol, cond, mask, seed) -> np.ndarray:
        from argen.model.generate import generate, parse_cfg_schedule
        codes = generate(self.model, cond, cond_mask=mask, cfg_scale=p.cfg_scale,
                         cfg_schedule=parse_cfg_schedule(p.cfg_schedule), temperature=p.temperature, top_k=p.top_k,
                         top_p=p.top_p, seed=seed)
        g = self.model.config.grid
        with torch.inference_mode():
            images = self.vq.decode(codes.view(-1, g, g))
        return to_uint8(images, p.image_size_eval, p.resize)

    def run(self, proto: SampleProtocol, out: str | Path, *, rank: int = 0, world: int = 1,
            captions: str | None = None, barrier=None) -> dict:
        """Sample on this rank; rank 0 packs `out` and writes `out.json`. Returns the protocol record."""
        p = self.resolved(proto)
        out = Path(out)
        if out.suffix != ".npz":
            raise ArgenError(f"output must end in .npz, got {out}")
        caps = _captions(captions, self.model)
        parts = out.with_name(out.name + ".parts")
        record = self._record(p, caps, world)
        # What must match for finished batches to be reused: settings (not the rank count) and the exact weights.
        weights = Path(self.ckpt) / "model.safetensors"
        identity = {"protocol": {k: v for k, v in record["protocol"].items() if k != "world_size"},
                    "model": record["model"]["config_sha256"], "vq": self.vq_path,
                    "weights": [weights.stat().st_size, weights.stat().st_mtime_ns]}
        ident_file = parts / "protocol.json"
        if rank == 0:
            if parts.exists() and (p.protocol == "reference" or not ident_file.is_file()
                                   or json.loads(ident_file.read_text()) != identity):
                shutil.rmtree(parts)  # different settings, or reference mode (never resumed): start afresh
            parts.mkdir(parents=True, exist_ok=True)
            ident_file.write_text(json.dumps(identity, indent=1, sort_keys=True))
        if barrier:
            barrier()
        start = time.time()
        if p.protocol == "balanced":
            self._run_balanced(p, parts, rank, world, caps)
        else:
            self._run_reference(p, parts, rank, world, caps)
        if barrier:
            barrier()
        if rank == 0:
            record["sampling_s"] = round(time.time() - start, 2)
            shape = self._pack(p, parts, out, world)
            record["shape"] = list(shape)
            side = sidecar_path(out)
            side.write_text(json.dumps(record, indent=2))
            shutil.rmtree(parts, ignore_errors=True)
        return record

    def _record(self, p: SampleProtocol, caps, world: int) -> dict:
        cfg = self.model.config
        weights = Path(self.ckpt) / "model.safetensors"
        proto = asdict(p)
        proto.update(world_size=world, image_size=cfg.grid * self.vq.config.downsample,
                     num_classes=cfg.num_classes if cfg.model_type == "c2i" else None,
                     captions=caps["path"] if caps else None)
        return {
            "format": "argen-samples-1",
            "protocol": proto,
            "model": {"path": self.ckpt, "name": cfg.name, "model_type": cfg.model_type,
                      "meta": self.record.get("meta", {}), "weights_bytes": weights.stat().st_size,
                      "config_sha256": hashlib.sha256((Path(self.ckpt) / "config.json").read_bytes()).hexdigest()},
            "vq": {"path": self.vq_path, "name": self.vq.config.name},
            "evaluator_version": EVALUATOR_VERSION,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    def _labels(self, idx: np.ndarray) -> torch.Tensor | None:
        if self.model.config.model_type != "c2i":
            return None
        return torch.from_numpy(idx % self.model.config.num_classes).long()

    def _run_balanced(self, p, parts: Path, rank: int, world: int, caps) -> None:
        n_batches = math.ceil(p.num / p.batch_size)
        mine = [b for b in range(rank, n_batches, world) if not (parts / f"batch-{b:08d}.npy").exists()]
        for b in tqdm(mine, desc=f"sampling (rank {rank})", unit="batch", disable=None if rank == 0 else True):
            idx = np.arange(b * p.batch_size, (b + 1) * p.batch_size)
            cond, mask = _condition(self.model, idx, self._labels(idx), caps, self.device, self.dtype)
            imgs = self._images(p, cond, mask, batch_seed(p.seed, b))
            _save_atomic(parts / f"batch-{b:08d}.npy", imgs)

    def _run_reference(self, p, parts: Path, rank: int, world: int, caps) -> None:
        dev.manual_seed_all(p.seed * world + rank)
        steps = math.ceil(p.num / (p.batch_size * world))
        for s in tqdm(range(steps), desc=f"sampling (rank {rank})", unit="batch", disable=None if rank == 0 else True):
            idx = s * p.batch_size * world + np.arange(p.batch_size) * world + rank
            labels = None
            if self.model.config.model_type == "c2i":
                labels = torch.randint(0, self.model.config.num_classes, (p.batch_size,), device=self.device)
            cond, mask = _condition(self.model, idx, labels, caps, self.device, self.dtype)
            imgs = self._images(p, cond, mask, None)
            _save_atomic(parts / f"step-{s:08d}-rank-{rank:05d}.npy", imgs)

    def _pack(self, p, parts: Path, out: Path, world: int) -> tuple:
        if p.protocol == "balanced":
            files = [[parts / f"batch-{b:08d}.npy"] for b in range(math.ceil(p.num / p.batch_size))]
        else:
            steps = math.ceil(p.num / (p.batch_size * world))
            files = [[parts / f"step-{s:08d}-rank-{r:05d}.npy" for r in range(world)] for s in range(steps)]
        first = np.load(files[0][0], mmap_mode="r")
        shape = (p.num, *first.shape[1:])
        left = p.num
        with npz_writer(out, shape) as write:
            for group in tqdm(files, desc=f"packing {out.name}", unit="batch", disable=None):
                arrays = [np.load(f) for f in group]
                # reference order: position i·world + rank within a step
                chunk = arrays[0] if len(arrays) == 1 else np.stack(arrays, 1).reshape(-1, *arrays[0].shape[1:])
                chunk = chunk[:left]
                write(chunk)
                left -= len(chunk)
                if left == 0:
                    break
        return shape


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    tmp.replace(path)
