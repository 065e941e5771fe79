"""Image sources for `argen tokenize`: where inputs come from and how the job splits them into output shards.

Every source turns into a deterministic list of *units*; unit j becomes output shard j, always with the same
inputs in the same order, so any part split, rerun or resume writes the same shards.

- `synthetic`: the demo set (argen.data_pipeline.synthetic); label = index % 10.
- `imagenet_folder`: `ROOT/<synset>/<image>`; labels are the sorted synset order (torchvision ImageFolder); files are
  numbered in (synset, file name) order like the reference's ImageFolder index.
- `imagenet_tar`: the ILSVRC2012 train tar, a tar of per-synset tars (`n01440764.tar`, ...); labels in sorted synset
  order. Indexing reads the member headers once (cached under the output's `_work/`); images are then read by
  byte range, so units can mix classes.
- `img2dataset`: LAION-COCO style WebDataset shards (`NNNNN.tar` with `key.jpg`, `key.txt`, `key.json`), optionally
  with img2dataset's `NNNNN.parquet` next to each tar to take captions from a column. Unit j = input tar j (no global
  listing needed); sample keys are img2dataset's keys.

Indexed sources (the first three) are permuted with a fixed seed before they are cut into units of
`samples_per_shard`, so class-sorted inputs give class-mixed shards; keys are the unpermuted index.
"""
from __future__ import annotations

import io
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from argen.data_pipeline import storage
from argen.data_pipeline.shard_format import iter_tar_samples, ShardFormatError
from argen.errors import ArgenError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif", ".jfif")
UNREADABLE_SOURCE = "unreadable_source"
MISSING_IMAGE = "missing_image"
NO_CAPTION = "no_caption"
EMPTY_CAPTION = "empty_caption"


@dataclass
class SourceIndex:
    """What a source resolved to: units of item descriptors (or unit specs), classes and index-time skips."""
    kind: str
    conditioning: str                              # "class" | "caption"
    units: list[Any]                               # indexed: list[list[item]]; img2dataset: list[unit spec]
    classes: list[str] = field(default_factory=list)
    num_items: int | None = None                   # None when unknown before reading (img2dataset without stats)
    skipped: dict[str, int] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "conditioning": self.conditioning, "units": self.units, "classes": self.classes,
                "num_items": self.num_items, "skipped": self.skipped, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> "SourceIndex":
        return cls(**d)


def _chunk(items: list[dict], per: int, seed: int | None) -> list[list[dict]]:
    if seed is not None and len(items) > 1:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    return [items[i: i + per] for i in range(0, len(items), per)]


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


# ------------------------------------------------------------------------------------------- indexing

def index_synthetic(num_images: int, size: int, seed: int, per: int, shuffle_seed: int | None) -> SourceIndex:
    from argen.data_pipeline.synthetic import NUM_CLASSES, synthetic_label

    items = [{"key": i, "synthetic": i, "size": size, "seed": seed, "label": synthetic_label(i)} for i in range(num_images)]
    return SourceIndex("synthetic", "class", _chunk(items, per, shuffle_seed),
                       classes=[str(c) for c in range(NUM_CLASSES)], num_items=num_images)


def index_folder(root: str, per: int, shuffle_seed: int | None, limit: int | None = None) -> SourceIndex:
    names = storage.list_names(root)
    if not names:
        raise ArgenError(f"source.path {root}: no such directory or it is empty (expected ROOT/<class>/<image>)")
    fs, base = storage.get_fs(root)
    classes = [n for n in names if not n.startswith(".") and fs.isdir(posixpath.join(base, n) if storage.is_remote(root) else os.path.join(base, n))]
    if not classes:
        raise ArgenError(f"source.path {root}: no class sub-directories (expected ROOT/<class>/<image>)")
    items: list[dict] = []
    ignored = 0
    for label, cls in enumerate(classes):
        for name in storage.list_names(storage.join(root, cls)):
            if name.startswith("."):
                continue
            if not _is_image_name(name):
                ignored += 1
                continue
            items.append({"key": len(items), "path": f"{cls}/{name}", "label": label})
            if limit and len(items) >= limit:
                break
        if limit and len(items) >= limit:
            break
    return SourceIndex("imagenet_folder", "class", _chunk(items, per, shuffle_seed), classes=classes,
                       num_items=len(items), meta={"root": root, "ignored_non_image_files": ignored})


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start+length) of a file (an inner tar inside the outer tar)."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: offset, 1: self.pos + offset, 2: self.length + offset}[whence]
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.length - self.pos))
        if n == 0:
            return 0
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        b[: len(data)] = data
        self.pos += len(data)
        return len(data)


def index_imagenet_tar(url: str, per: int, shuffle_seed: int | None, limit: int | None = None) -> SourceIndex:
    """Index the ILSVRC train tar (outer tar of per-synset tars) by byte offsets."""
    if not storage.exists(url):
        raise ArgenError(f"source.path {url}: no such file (expected the ILSVRC2012 train tar of per-class tars)")
    skipped: dict[str, int] = {}
    inner: list[tuple[str, int, int]] = []
    # headers are read in order with forward seeks: on S3 large read-ahead blocks turn that into a sequential pass
    with storage.open_url(url, "rb", **({"block_size": 64 << 20} if storage.is_remote(url) else {})) as f:
        try:
            with tarfile.open(fileobj=f, mode="r:") as outer:
                for m in outer:
                    if m.isfile() and m.name.endswith(".tar"):
                        inner.append((posixpath.basename(m.name)[:-4], m.offset_data, m.size))
        except tarfile.TarError as e:
            if not inner:
                raise ArgenError(f"source.path {url}: not a readable tar ({e})") from None
            skipped[UNREADABLE_SOURCE] = skipped.get(UNREADABLE_SOURCE, 0) + 1  # truncated outer tar: keep the rest
        if not inner:
            raise ArgenError(f"source.path {url}: holds no per-class .tar members")
        inner.sort()
        classes = [c for c, _, _ in inner]
        items: list[dict] = []
        ignored = 0
        for label, (cls, start, length) in enumerate(inner):
            members = []
            try:
                with tarfile.open(fileobj=io.BufferedReader(_Window(f, start, length)), mode="r:") as t:
                    for m in t:
                        if m.isfile():
                            members.append((m.name, m.offset_data, m.size))
            except (tarfile.TarError, OSError, EOFError):
                skipped[UNREADABLE_SOURCE] = skipped.get(UNREADABLE_SOURCE, 0) + 1
            for name, off, size in members:
                if not _is_image_name(name):
                    ignored += 1
                    continue
                items.append({"key": len(items), "offset": start + off, "size": size, "label": label,
                              "name": f"{cls}/{posixpath.basename(name)}"})
                if limit and len(items) >= limit:
                    break
            if limit and len(items) >= limit:
                break
    return SourceIndex("imagenet_tar", "class", _chunk(items, per, shuffle_seed), classes=classes,
                       num_items=len(items), skipped=skipped, meta={"tar": url, "ignored_non_image_files": ignored})


def _expand(path: str) -> list[str]:
    if "{" in path:
        import braceexpand

        return list(braceexpand.braceexpand(path))
    names = storage.list_names(path)
    if not names:
        if storage.exists(path) and path.endswith(".tar"):
            return [path]
        raise ArgenError(f"source.path {path}: no such directory or it holds no .tar shards")
    return [storage.join(path, n) for n in names if n.endswith(".tar")]


def index_img2dataset(path: str, parquet: bool, limit_shards: int | None = None) -> SourceIndex:
    urls = _expand(path)
    if not urls:
        raise ArgenError(f"source.path {path}: no .tar shards found")
    if limit_shards:
        urls = urls[:limit_shards]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(16) as pool:  # one small object per shard: tens of thousands on S3 for LAION
        counts = list(pool.map(_img2dataset_count, [u[: -len(".tar")] + "_stats.json" for u in urls]))
    units = []
    for u, count in zip(urls, counts):
        spec: dict[str, Any] = {"tar": u, "count": count}
        if parquet:
            spec["parquet"] = u[: -len(".tar")] + ".parquet"
        units.append(spec)
    return SourceIndex("img2dataset", "caption", units, num_items=known_total(counts),
                       meta={"path": path, "shards": len(urls)})


def known_total(counts: list[int | None]) -> int | None:
    """The sum, when every count is known (img2dataset shards without a stats file have none)."""
    return sum(counts) if all(c is not None for c in counts) else None


def _img2dataset_count(stats_url: str) -> int | None:
    """Successful downloads in a shard from img2dataset's NNNNN_stats.json (for the progress bar), if present.
    Optional: any failure to read it (missing, unreadable, a storage error) leaves the count unknown."""
    import json

    try:
        return int(json.loads(storage.read_whole(stats_url))["successes"])
    except (OSError, KeyError, ValueError, TypeError):
        return None


# ------------------------------------------------------------------------------------------- unit loading

def _safe_key(key: str) -> str:
    return key.replace(".", "_").replace("/", "_")


def _read_parquet_captions(url: str, column: str) -> dict[str, str | None] | None:
    import pyarrow.parquet as pq

    try:
        with storage.open_url(url, "rb") as f:
            table = pq.read_table(f, columns=["key", column])
    except FileNotFoundError:
        return None
    except Exception as e:
        raise ArgenError(f"{url}: cannot read column 'key'/'{column}' ({e})") from None
    return dict(zip(table.column("key").to_pylist(), table.column(column).to_pylist()))


def load_img2dataset_unit(spec: dict, caption_column: str) -> tuple[list[dict], dict[str, int]]:
    """Read one img2dataset tar into (item descriptors with the raw bytes, skip counts); never raises for bad
    shards."""
    skipped: dict[str, int] = {}
    captions = None
    if spec.get("parquet"):
        captions = _read_parquet_captions(spec["parquet"], caption_column)
    samples: list[dict] = []
    try:
        with storage.open_url(spec["tar"], "rb") as f:
            for s in iter_tar_samples(f, spec["tar"]):
                samples.append(s)
    except FileNotFoundError:
        skipped[UNREADABLE_SOURCE] = 1
        return [], skipped
    except (ShardFormatError, OSError):
        # keep the samples read before the damage; the rest of the shard is lost and counted once
        skipped[UNREADABLE_SOURCE] = 1
    items = []
    for s in samples:
        key = _safe_key(s["__key__"])
        img = next((s[e] for e in ("jpg", "jpeg", "png", "webp") if e in s), None)
        if img is None:
            skipped[MISSING_IMAGE] = skipped.get(MISSING_IMAGE, 0) + 1
            continue
        caption = None
        if captions is not None:
            caption = captions.get(s["__key__"])
        if caption is None and "txt" in s:
            caption = s["txt"].decode("utf-8", errors="replace")
        if caption is None and "json" in s:
            try:
                import json

                caption = json.loads(s["json"]).get("caption")
            except Exception:
                caption = None
        items.append({"key": key, "data": img, "caption": caption})
    return items, skipped


def read_item_bytes(item: dict, source: SourceIndex, root: str, _handles: dict = {}) -> bytes:  # noqa: B006
    """The raw bytes of an indexed item (folder file or byte range of the ILSVRC tar)."""
    if "data" in item:
        return item["data"]
    if source.kind == "imagenet_folder":
        url = storage.join(root, *item["path"].split("/"))
        if not storage.is_remote(url):
            with open(url, "rb") as f:
                return f.read()
        return storage.read_whole(url)
    if source.kind == "imagenet_tar":
        # one open handle per worker process: ranges are read with seek+read (S3: one range GET each)
        key = (os.getpid(), root)
        f = _handles.get(key)
        if f is None:
            # S3: no read-ahead cache, so each image is exactly one range GET (s3fs would otherwise fetch 5 MB
            # blocks around every randomly placed image)
            f = _handles[key] = storage.open_url(root, "rb", **({"cache_type": "none"} if storage.is_remote(root) else {}))
        f.seek(item["offset"])
        return f.read(item["size"])
    raise ValueError(f"source {source.kind} items carry no bytes")
