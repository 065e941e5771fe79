"""The tokenize job: plan units, run this process's part (resumably), finalize the manifest.

Resume protocol (all state lives next to the output, so it works for local paths and S3 alike):
1. `_work/index-<fp>.json.gz` — the source index (deterministic; whichever part gets there first writes it).
2. Unit j is written as `shard-j` (committed whole), THEN `_work/shard-j.json` (its manifest entry and skip counts,
   tagged with the config fingerprint). A unit is done only when its record exists with the same fingerprint, so a
   job killed anywhere redoes at most the units in flight, and rewrites them byte for byte.
3. Finalize checks that every unit has a record, writes `manifest.json` last, and removes `_work/`.
The fingerprint covers everything that changes the bytes of the output (source, augmentation, image size, VQ
weights, dtype, T5, shard size, compression), not throughput knobs (workers, batch sizes).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from argen import device as dev
from argen.config import to_dict
from argen.data_pipeline import shard_format as sf
from argen.data_pipeline import storage
from argen.errors import ArgenError
from argen.tokenize_offline import images as im
from argen.tokenize_offline import sources as src
from argen.tokenize_offline.config import TokenizeConfig

WORK = "_work"
# knobs that change speed, not bytes: left out of the fingerprint so they can change between resumes
# (kernel choice can still flip an argmin near-tie; the tests compare runs with equal knobs bit for bit)
_NOT_FINGERPRINTED = {("output", "url"), ("num_workers",), ("images_per_batch",), ("vq", "crops_per_forward"),
                      ("vq", "channels_last"),
                      ("text", "batch_size"), ("progress",), ("threads",)}


# ------------------------------------------------------------------------------------------------ parts

@dataclass(frozen=True)
class Part:
    index: int
    count: int
    origin: str  # "flags" | "slurm_array" | "torchrun" | "single"


def resolve_part(part: int | None = None, parts: int | None = None, environ: dict | None = None) -> Part:
    """This process's part: --part/--parts flags, else a Slurm array task, else torchrun's RANK/WORLD_SIZE."""
    env = os.environ if environ is None else environ
    if part is not None or parts is not None:
        if part is None or parts is None:
            raise ArgenError("--part and --parts go together (e.g. --part 0 --parts 4)")
        p = Part(part, parts, "flags")
    elif "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        lo = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        p = Part(int(env["SLURM_ARRAY_TASK_ID"]) - lo, int(env["SLURM_ARRAY_TASK_COUNT"]), "slurm_array")
    elif "RANK" in env and "WORLD_SIZE" in env:
        p = Part(int(env["RANK"]), int(env["WORLD_SIZE"]), "torchrun")
    else:
        p = Part(0, 1, "single")
    if p.count < 1 or not 0 <= p.index < p.count:
        raise ArgenError(f"part {p.index} of {p.count} ({p.origin}) is out of range")
    return p


# ------------------------------------------------------------------------------------------------ helpers

def vq_identity(path: str) -> dict:
    """Who the tokenizer is: its config and the sha256 of its weights (a different VQ means different codes)."""
    from argen.model.io import config_from_dict, read_record

    record = read_record(path)
    if record["kind"] != "vq":
        raise ArgenError(f"vq.path {path} holds a '{record['kind']}' model, not a VQ tokenizer")
    weights = Path(path) / "model.safetensors"
    if not weights.is_file():
        raise ArgenError(f"missing weights file: {weights}")
    cfg = record["config"]
    sha = storage.sha256_file_cached(weights)
    name = cfg.get("name") or "vq"
    downsample = int(config_from_dict("vq", cfg).downsample)
    return {"id": f"{name}@{sha[:12]}", "name": name, "codebook_size": int(cfg["codebook_size"]), "downsample": downsample,
            "path": str(Path(path).resolve()), "sha256": sha, "config": cfg}


def fingerprint(cfg: TokenizeConfig, vq_id: dict) -> str:
    d = to_dict(cfg)
    for keys in _NOT_FINGERPRINTED:
        node = d
        for k in keys[:-1]:
            node = node[k]
        node.pop(keys[-1], None)
    d["vq"]["path"] = vq_id["sha256"]  # the weights, wherever they live
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def _merge(into: dict[str, int], more: dict[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + int(v)


class _UnitDataset(torch.utils.data.Dataset):
    """Decode + convert + crop one input per item, in DataLoader workers; bad input becomes a skip record."""

    def __init__(self, items: list[dict], index: src.SourceIndex, root: str, cfg: TokenizeConfig, captions: bool):
        self.items, self.index, self.root, self.captions = items, index, root, captions
        self.mode, self.ranges, self.size = cfg.augment.mode, list(cfg.augment.crop_ranges), cfg.image_size
        need = max(im.crop_sizes(cfg.image_size, self.ranges)) if self.mode == "ten_crop" else cfg.image_size
        self.policy = im.DecodePolicy(min_short_side=cfg.min_short_side, max_pixels=cfg.max_pixels, crop_size=need)

    def __len__(self) -> int:
        return len(self.items)

    def _read(self, item: dict, attempts: int = 4) -> bytes | None:
        """The item's bytes; None for an input that is gone or unreadable (a skip). Other I/O errors (network,
        server) are retried, then raised: the job stops and a rerun resumes, rather than silently dropping images."""
        for attempt in range(attempts):
            try:
                return src.read_item_bytes(item, self.index, self.root)
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                return None
            except OSError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 * 2 ** attempt)
        return None

    def __getitem__(self, i: int) -> dict:
        item = self.items[i]
        out: dict[str, Any] = {"key": item["key"], "label": item.get("label"), "caption": None, "skip": None,
                               "conv": [], "crops": None}
        caption = None
        if self.captions:
            if "synthetic" in item:
                from argen.data_pipeline.synthetic import synthetic_caption

                raw = synthetic_caption(item["synthetic"])
            else:
                raw = item.get("caption")
            if raw is None or not str(raw).strip():
                out["skip"] = src.NO_CAPTION
                return out
            from argen.model.text_encoder import clean_caption

            caption = clean_caption(raw)
            if not caption:
                out["skip"] = src.EMPTY_CAPTION
                return out
            out["caption"] = caption
        data = None
        if "synthetic" not in item:
            data = self._read(item)  # storage errors propagate from here (after retries), not below
            if data is None:
                out["skip"] = src.UNREADABLE_SOURCE
                return out
        try:
            if data is None:
                from argen.data_pipeline.synthetic import synthetic_image

                img, conv, skip = synthetic_image(item["synthetic"], item["size"], item["seed"]), [], None
            else:
                img, conv, skip = im.decode_image(data, self.policy)
            if skip:
                out["skip"] = skip
                return out
            out["crops"] = im.augment(img, self.size, self.mode, self.ranges)
            out["conv"] = conv
        except Exception:  # a pathological image must not take the job down: count it
            out["skip"] = im.CORRUPT
            out["crops"] = None
        return out


def _collate(batch: list[dict]) -> list[dict]:
    return batch


# ------------------------------------------------------------------------------------------------ the job

class TokenizeJob:
    def __init__(self, cfg: TokenizeConfig, log=print):
        self.cfg = cfg
        self.log = log
        self.prefix = cfg.output.url.rstrip("/") if storage.is_remote(cfg.output.url) else os.path.abspath(cfg.output.url)
        self.work = storage.join(self.prefix, WORK)
        self.vq_id = vq_identity(cfg.vq.path)
        if self.vq_id["codebook_size"] > sf.MAX_CODEBOOK:
            raise ArgenError(f"vq codebook_size {self.vq_id['codebook_size']} does not fit uint16 codes "
                             f"(max {sf.MAX_CODEBOOK}); the shard format refuses it")
        self.fp = fingerprint(cfg, self.vq_id)
        self.captions = cfg.text.enabled or cfg.source.kind == "img2dataset"

    # ---------------------------------------------------------------- index
    @property
    def index_url(self) -> str:
        return storage.join(self.work, f"index-{self.fp[:16]}.json.gz")

    def record_url(self, j: int) -> str:
        return storage.join(self.work, f"shard-{j:06d}.json")

    def source_root(self) -> str:
        s = self.cfg.source
        return s.path.rstrip("/") if storage.is_remote(s.path) else os.path.abspath(s.path) if s.path else ""

    def build_index(self) -> src.SourceIndex:
        s, per, seed = self.cfg.source, self.cfg.output.samples_per_shard, self.cfg.source.shuffle_seed
        if s.kind == "synthetic":
            size = s.synthetic_size or (max(im.crop_sizes(self.cfg.image_size, self.cfg.augment.crop_ranges))
                                        if self.cfg.augment.mode == "ten_crop" else self.cfg.image_size)
            n = min(s.num_images, s.limit) if s.limit else s.num_images
            idx = src.index_synthetic(n, size, s.synthetic_seed, per, seed)
            if self.cfg.text.enabled:
                idx.conditioning = "caption"
            return idx
        if s.kind == "imagenet_folder":
            return src.index_folder(self.source_root(), per, seed, s.limit)
        if s.kind == "imagenet_tar":
            return src.index_imagenet_tar(self.source_root(), per, seed, s.limit)
        return src.index_img2dataset(self.source_root(), s.parquet, s.limit)

    def _cached_index(self) -> src.SourceIndex | None:
        """The index an earlier run wrote, or None when it is missing or unreadable (read directly, no exists() check
        first)."""
        try:
            return src.SourceIndex.from_dict(json.loads(gzip.decompress(storage.read_whole(self.index_url))))
        except (OSError, EOFError, ValueError, TypeError):  # missing (an OSError), truncated gzip (EOFError), garbled
            return None

    def load_index(self) -> src.SourceIndex:
        index = self._cached_index()
        if index is not None:
            return index
        # missing or unreadable cache: (re)build it (deterministic, so any part may rewrite it)
        t = time.time()
        index = self.build_index()
        if not index.units:
            raise ArgenError(f"source {self.cfg.source.kind} at '{self.cfg.source.path}' yielded no images")
        data = gzip.compress(json.dumps(index.to_dict()).encode(), mtime=0)
        storage.put_bytes_atomic(self.index_url, data)
        self.log(f"indexed {index.kind}: {len(index.units)} shards"
                 + (f", {index.num_items} images" if index.num_items is not None else "")
                 + f" in {time.time() - t:.1f}s")
        return index

    # ---------------------------------------------------------------- records
    def read_record(self, j: int) -> dict | None:
        try:
            rec = json.loads(storage.read_whole(self.record_url(j)))
        except (FileNotFoundError, ValueError):
            return None
        return rec if rec.get("fingerprint") == self.fp else None

    def done_units(self, n_units: int) -> dict[int, dict]:
        names = set(storage.list_names(self.work))
        out = {}
        for j in range(n_units):
            if f"shard-{j:06d}.json" in names:
                rec = self.read_record(j)
                if rec is not None:
                    out[j] = rec
        return out

    def check_existing_manifest(self, overwrite: bool) -> bool:
        """True when the output is already a finished data set of this very config."""
        murl = sf.manifest_url(self.prefix)
        if not storage.exists(murl):
            return False
        try:
            m = sf.read_manifest(murl)
            same = m.source.get("fingerprint") == self.fp
        except ArgenError:
            same = False
        if same:
            return True
        if not overwrite:
            raise ArgenError(f"{self.prefix} already holds a finished data set made with a different config or VQ; "
                             f"use another output.url or pass --overwrite")
        storage.delete(murl)  # no longer complete: readers must not mix old and new shards
        return False

    # ---------------------------------------------------------------- run
    def run_part(self, part: Part, overwrite: bool = False) -> dict:
        cfg = self.cfg
        if self.check_existing_manifest(overwrite):
            self.log(f"{self.prefix}: already complete (manifest.json matches this config); nothing to do")
            return {"complete": True, "written": 0, "resumed": 0}
        storage.makedirs(self.work)
        index = self.load_index()
        mine = [j for j in range(len(index.units)) if j % part.count == part.index]
        done = self.done_units(len(index.units))
        pending = [j for j in mine if j not in done]
        if len(pending) < len(mine):
            self.log(f"resuming part {part.index}/{part.count}: {len(mine) - len(pending)} of {len(mine)} shards "
                     f"already complete")
        stats = {"written": 0, "resumed": len(mine) - len(pending), "images": 0, "stored": 0, "bytes": 0,
                 "skipped": {}, "converted": {}}
        if not pending:
            return stats

        device = dev.default_device()
        if not dev.is_accelerator(device) and not dev.keep_freed_cpu_memory():  # inherited by forked workers
            self.log("note: glibc allocator thresholds not set (ARGEN_KEEP_MALLOC=1, a preloaded allocator or a glibc "
                     "that refuses them); unless another allocator reuses freed blocks, CPU encoding runs up to 2x "
                     "slower (argen.device.keep_freed_cpu_memory)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # oversubscribed CPUs run small convs far slower with spinning threads
        from argen.model.io import load as load_model

        vq = load_model(cfg.vq.path, device=device)
        if cfg.vq.channels_last:
            vq = vq.to(memory_format=torch.channels_last)
        if cfg.image_size % vq.downsample:
            raise ArgenError(f"image_size {cfg.image_size} is not a multiple of the VQ downsample factor {vq.downsample}")
        dtype = torch.bfloat16 if cfg.vq.dtype == "bfloat16" else None
        t5 = None
        if cfg.text.enabled:
            from argen.model.text_encoder import T5TextEncoder

            t5 = T5TextEncoder(cfg.text.t5_path, device=device, dtype=getattr(torch, cfg.text.dtype),
                               max_length=cfg.text.max_length)
        # once per part, after T5 has taken its memory and before any forward (afterwards the caching allocator
        # holds the activations and free memory reads half as much). It follows the memory free at start, so a
        # resumed part may encode at another batch shape: codes can then differ at argmin near-ties, as between
        # any two batch sizes, never in number or order. Pin vq.crops_per_forward for bit-identical reruns.
        per_forward = cfg.vq.crops_per_forward or auto_crops_per_forward(
            vq.config, cfg.image_size, dev.free_memory_bytes(device))
        self.log(f"part {part.index}/{part.count}: {per_forward} crops per VQ forward on {device}"
                 + ("" if cfg.vq.crops_per_forward else " (auto)"))
        if index.kind != "img2dataset":
            total = sum(len(index.units[j]) for j in pending)
        else:  # known only when img2dataset's NNNNN_stats.json files were found
            total = src.known_total([index.units[j].get("count") for j in pending])
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc=f"tokenize part {part.index}/{part.count}", dynamic_ncols=True,
                   disable=not cfg.progress, smoothing=0.05, file=sys.stderr)
        t0 = time.time()
        try:
            for j in pending:
                rec = self._run_unit(j, index, vq, dtype, per_forward, t5, device, bar)
                storage.put_bytes_atomic(self.record_url(j), json.dumps(rec).encode())
                stats["written"] += 1
                stats["images"] += rec["num_inputs"]
                if rec["shard"]:
                    stats["stored"] += rec["shard"]["num_samples"]
                    stats["bytes"] += rec["shard"]["bytes"]
                _merge(stats["skipped"], rec["skipped"])
                _merge(stats["converted"], rec["converted"])
                bar.set_postfix(shards=f"{stats['written']}/{len(pending)}", skipped=sum(stats["skipped"].values()))
        finally:
            bar.close()
        stats["seconds"] = time.time() - t0
        return stats

    def _run_unit(self, j: int, index: src.SourceIndex, vq, dtype, per_forward: int, t5, device, bar) -> dict:
        cfg = self.cfg
        skipped: dict[str, int] = {}
        converted: dict[str, int] = {}
        if index.kind == "img2dataset":
            items, sk = src.load_img2dataset_unit(index.units[j], cfg.source.caption_column)
            _merge(skipped, sk)  # the bar counts images (img2dataset's "successes"), not rows without one
        else:
            items = index.units[j]
        num_inputs = len(items) + sum(v for k, v in skipped.items() if k != src.UNREADABLE_SOURCE)
        ds = _UnitDataset(items, index, self.source_root(), cfg, self.captions)
        workers = min(cfg.num_workers, max(1, len(items) // cfg.images_per_batch))
        loader = torch.utils.data.DataLoader(ds, batch_size=cfg.images_per_batch, shuffle=False,
                                             num_workers=workers if items else 0, collate_fn=_collate)
        info = None
        with sf.ShardWriter(self.prefix, j, compression=cfg.output.compression) as writer:
            for batch in loader:
                ok = []
                for r in batch:
                    if r["skip"]:
                        skipped[r["skip"]] = skipped.get(r["skip"], 0) + 1
                    else:
                        ok.append(r)
                        for c in r["conv"]:
                            converted[c] = converted.get(c, 0) + 1
                if ok:
                    codes = encode_crops(vq, [r["crops"] for r in ok], per_forward, device, dtype,
                                         cfg.vq.channels_last)
                    feats = t5_features(t5, [r["caption"] for r in ok], cfg.text.batch_size) if t5 else [None] * len(ok)
                    for r, c, f in zip(ok, codes, feats):
                        writer.write(sf.encode_sample(r["key"], c, label=r["label"], caption=r["caption"], t5=f,
                                                      t5_dtype=cfg.text.dtype, codebook_size=vq.codebook_size))
                bar.update(len(batch))
            if writer.num_samples:
                info = writer.commit()
        return {"fingerprint": self.fp, "index": j, "shard": dataclasses.asdict(info) if info else None,
                "num_inputs": num_inputs, "skipped": skipped, "converted": converted,
                "t5_dim": t5.dim if t5 is not None else None}

    # ---------------------------------------------------------------- finalize
    def finalize(self, wait_s: float = 0.0, poll_s: float = 5.0) -> sf.Manifest:
        """Write manifest.json from the unit records; with wait_s > 0, wait that long for other parts first."""
        if self.check_existing_manifest(overwrite=False):
            return sf.read_manifest(self.prefix)
        index = self._cached_index()
        if index is None:
            raise ArgenError(f"cannot finalize {self.prefix}: no tokenize job with this config has run there "
                             f"(missing or unreadable {self.index_url})")
        n = len(index.units)
        deadline = time.time() + wait_s
        while True:
            done = self.done_units(n)
            missing = [j for j in range(n) if j not in done]
            if not missing or time.time() >= deadline:
                break
            time.sleep(poll_s)
        if missing:
            raise ArgenError(f"cannot finalize {self.prefix}: {len(missing)} of {n} shards are not done "
                             f"(e.g. {', '.join(str(j) for j in missing[:8])}); run the missing parts again "
                             f"(any --parts split resumes them)")
        skipped = dict(index.skipped)
        converted: dict[str, int] = {}
        shards = []
        inputs = 0
        for j in range(n):
            rec = done[j]
            _merge(skipped, rec["skipped"])
            _merge(converted, rec["converted"])
            inputs += rec["num_inputs"]
            if rec["shard"]:
                shards.append(sf.ShardInfo(**rec["shard"]))
        cfg = self.cfg
        n_aug_names = im.augmentation_names(cfg.augment.mode, cfg.augment.crop_ranges)
        downsample = self.vq_id["downsample"]
        m = sf.Manifest(
            tokenizer={"id": self.vq_id["id"], "name": self.vq_id["name"], "codebook_size": self.vq_id["codebook_size"],
                       "downsample": downsample, "sha256": self.vq_id["sha256"], "path": self.vq_id["path"],
                       "dtype": cfg.vq.dtype},
            codebook_size=self.vq_id["codebook_size"], image_size=cfg.image_size,
            grid=cfg.image_size // downsample, augmentations=n_aug_names,
            conditioning=index.conditioning, num_classes=len(index.classes) if index.conditioning == "class" else None,
            t5=({"model": cfg.text.t5_path, "dim": next((done[j].get("t5_dim") for j in range(n) if done[j].get("t5_dim")), None), "dtype": cfg.text.dtype,
                 "max_length": cfg.text.max_length} if cfg.text.enabled else None),
            compression=cfg.output.compression, shards=shards, skipped=skipped, converted=converted,
            source={"kind": index.kind, "path": cfg.source.path, "classes": index.classes, "inputs": inputs,
                    "fingerprint": self.fp, **{k: v for k, v in index.meta.items() if k not in ("root", "tar", "path")}},
            config=to_dict(cfg), created_by=_created_by())
        sf.write_manifest(self.prefix, m)
        self._cleanup({s.name for s in shards})
        return m

    def _cleanup(self, keep: set[str]) -> None:
        for name in storage.list_names(self.prefix):
            stale_shard = name.startswith("shard-") and name not in keep       # from an earlier, bigger config
            temp = name.startswith(".shard-") and ".tmp-" in name               # left by a killed local writer
            if stale_shard or temp:
                storage.delete(storage.join(self.prefix, name))
        storage.delete(self.work)


def _created_by() -> str:
    from argen import __version__

    return f"argen {__version__}"


def auto_crops_per_forward(vq_cfg, image_size: int, free_bytes: int | None) -> int:
    """Crops per VQ forward: 20 on a CPU (free_bytes None), where small batches stay in cache and run fastest; on
    an accelerator as many as fit in half its free memory, at most 512. An inference forward peaks at about six
    full-resolution feature maps (measured on CPU: 774 MB for 4 crops of VQ-16 at 256 px in fp32, against 6 x
    128 MB), so a crop of VQ-16 at 256 px costs ~200 MB in fp32: the old fixed 512 crops (103 GB) overflow any
    80 GB card. Sized in fp32 under bf16 too: autocast runs GroupNorm, and so the SiLU after it, in fp32."""
    if free_bytes is None:
        return 20
    per_crop = 6 * vq_cfg.ch * vq_cfg.encoder_ch_mult[0] * image_size * image_size * 4
    return max(1, min(512, free_bytes // 2 // per_crop))


def encode_crops(vq, crops: list[np.ndarray], per_forward: int, device, dtype,
                 channels_last: bool = False) -> list[np.ndarray]:
    """uint8 crops of several images -> per image uint16-ready codes (n_aug, grid*grid), VQ in chunks."""
    allc = np.concatenate(crops)
    out = []
    with torch.inference_mode(), dev.autocast(device, dtype):
        for i in range(0, len(allc), per_forward):
            x = im.to_model_input(allc[i: i + per_forward]).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(vq.encode(x).reshape(x.shape[0], -1).cpu())
    codes = torch.cat(out).numpy()
    res, k = [], 0
    for c in crops:
        res.append(codes[k: k + len(c)])
        k += len(c)
    return res


def t5_features(t5, captions: list[str], batch_size: int) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for i in range(0, len(captions), batch_size):
        out += t5.encode(captions[i: i + batch_size])
    return out


def summary_lines(stats: dict, manifest: sf.Manifest | None = None) -> list[str]:
    lines = []
    if "images" in stats:
        secs = stats.get("seconds", 0) or 1e-9
        lines.append(f"this part: {stats['images']} inputs, {stats['stored']} stored, "
                     f"{sum(stats['skipped'].values())} skipped, {stats['written']} shards written, "
                     f"{stats['resumed']} already done, {stats['bytes'] / 2**20:.2f} MiB, "
                     f"{stats['images'] / secs:.1f} img/s")
        if stats["skipped"]:
            lines.append("  skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(stats["skipped"].items())))
        if stats["converted"]:
            lines.append("  converted: " + ", ".join(f"{k}={v}" for k, v in sorted(stats["converted"].items())))
    if manifest is not None:
        total_bytes = sum(s.bytes for s in manifest.shards)
        lines.append(f"data set: {manifest.num_samples} samples in {len(manifest.shards)} shards "
                     f"({total_bytes / 2**20:.2f} MiB), codes {manifest.codes_shape} uint16, "
                     f"{manifest.conditioning}-conditional")
        if manifest.skipped:
            lines.append("  skipped: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.skipped.items())))
        if manifest.converted:
            lines.append("  converted: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.converted.items())))
    return lines

