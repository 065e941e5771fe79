"""The code-shard format: the one module that both the tokenizer (writer) and the training loader (reader) import.

Format version 1
================

A data set is a directory (local path or `s3://bucket/prefix`) holding

    manifest.json                 written last; its presence means the data set is complete
    shard-000000.tar[.zst|.gz]    WebDataset tar shards, numbered from 0
    shard-000001.tar[.zst|.gz]
    ...
    _work/                        (only while a job runs) per-shard records used to resume and to finalize

Shards
------
Each shard is a POSIX tar (GNU format), optionally compressed as a whole: `compression: "gzip"` (file name
`shard-NNNNNN.tar.gz`; `tarfile` mode "r|*" and webdataset read it transparently) or `"zstd"` (`.tar.zst`, about the
same bytes as gzip and about 5x faster to inflate, which matters to the loader: codes are nearly incompressible, so
inflating is most of its work; other tools need `zstd -d` first). Shards are written to a local temp file and
committed whole (local: rename; S3: one PUT), so a shard either exists complete or not at all. Bytes are
deterministic (mtime 0, uid/gid 0, gzip mtime 0, single-threaded zstd): rerunning a shard reproduces its sha256.

Samples are consecutive tar members sharing a key (WebDataset convention, key = member name up to the first dot):

    <key>.codes.npy   numpy .npy, dtype uint16, shape (n_aug, grid*grid): VQ codes, one row per augmentation,
                      rows in the order of manifest["augmentations"]. Codebooks larger than 65536 are refused.
    <key>.cls         class label as ASCII decimal (class-conditional data sets)
    <key>.txt         caption, UTF-8, after cleaning (text-conditional data sets)
    <key>.t5.npy      optional T5 encoder features, shape (L, d_model) with L the valid token count (EOS included,
                      no padding). dtype per manifest["t5"]["dtype"]: "float16" is stored as float16; "bfloat16" as
                      the raw bits in a uint16 array (numpy has no bfloat16) — decode_sample restores the dtype.

Keys are the zero-padded global source index (`%010d`): the position of the input in the source's deterministic
order, so a key names the same image in every run, part split or resume. Sources with their own unique keys
(img2dataset) keep them, with '.' and '/' replaced by '_'.

The manifest's shard list is authoritative: a shard index whose inputs were all skipped has no file.

manifest.json
-------------
    {
      "format_version": 1,
      "tokenizer": {"id": "...", "codebook_size": 16384, "downsample": 16, "path": "..."},
      "codebook_size": 16384, "image_size": 256, "grid": 16,
      "augmentations": ["r1.1/tl", ..., "r1.05/br-flip"],      # one name per codes row
      "conditioning": "class" | "caption",  "num_classes": 1000 | null,
      "t5": null | {"model": "...", "dim": 2048, "dtype": "bfloat16", "max_length": 120},
      "compression": "gzip" | "zstd" | "none",
      "shards": [{"name": "shard-000000.tar.gz", "num_samples": 1000, "bytes": 123, "sha256": "..."}, ...],
      "num_samples": 1281167,
      "skipped": {"corrupt": 3, "too_small": 12, ...},         # inputs not stored, by reason
      "converted": {"cmyk": 22, "grayscale": 40, ...},          # inputs stored after a conversion, by kind
      "source": {...}, "created_by": "argen 0.1.0", "config": {...}
    }
A reader refuses a manifest whose format_version is newer than the FORMAT_VERSION it knows.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any, Iterator

import numpy as np
import zstandard

from argen.data_pipeline import storage
from argen.errors import ArgenError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_CODEBOOK = 65536  # uint16
T5_DTYPES = ("bfloat16", "float16")
COMPRESSIONS = ("gzip", "zstd", "none")
_SUFFIX = {"gzip": ".gz", "zstd": ".zst", "none": ""}
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ShardFormatError(ArgenError):
    """A shard or manifest does not follow the format (corrupt, wrong version, wrong shapes)."""


# ------------------------------------------------------------------------------------------------- names

def shard_name(index: int, compression: str = "gzip") -> str:
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    return f"shard-{index:06d}.tar" + _SUFFIX[compression]


def shard_url(prefix: str, index: int, compression: str = "gzip") -> str:
    return storage.join(prefix, shard_name(index, compression))


def decompress(data: bytes) -> bytes:
    """A shard's tar bytes, whatever its compression (told by the magic bytes, not the name)."""
    if data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    if data[:4] == _ZSTD_MAGIC:
        if zstandard.frame_content_size(data) >= 0:  # ShardWriter's one frame records its size: one exact buffer
            try:
                return zstandard.ZstdDecompressor().decompress(data, allow_extra_data=False)
            except zstandard.ZstdError:
                pass  # more frames follow (or damage, which the stream read below reports)
        # streamed frames (`tar c | zstd`) record no size, and a file may hold several frames, as gzip may members
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data), read_across_frames=True).read()
    return data


def manifest_url(prefix: str) -> str:
    return storage.join(prefix, MANIFEST_NAME)


def sample_key(index: int | str) -> str:
    """`%010d` of an integer source index; a string key (e.g. img2dataset's) is used as is but checked."""
    if isinstance(index, str):
        if not index or "." in index or "/" in index:
            raise ValueError(f"sample key {index!r} must be non-empty without '.' or '/'")
        return index
    return f"{int(index):010d}"


# ------------------------------------------------------------------------------------------------- samples

def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:
        raise ShardFormatError(f"cannot decode {what}: {e}") from None


def codes_to_uint16(codes: Any, codebook_size: int | None = None) -> np.ndarray:
    """Check and convert codes (any int array/tensor of shape (n_aug, T)) to uint16."""
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if arr.ndim != 2:
        raise ValueError(f"codes must have shape (n_aug, grid*grid), got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {arr.dtype}")
    limit = MAX_CODEBOOK if codebook_size is None else codebook_size
    if arr.size and (arr.min() < 0 or arr.max() >= limit):
        raise ValueError(f"codes out of range [0, {limit}): min {arr.min()}, max {arr.max()}")
    return arr.astype(np.uint16)


def t5_to_numpy(features: Any, dtype: str) -> np.ndarray:
    """(L, D) features -> the stored array: float16, or the raw bits of bfloat16 as uint16."""
    import torch

    if dtype not in T5_DTYPES:
        raise ValueError(f"t5 dtype must be one of {T5_DTYPES}, got {dtype!r}")
    t = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if t.ndim != 2:
        raise ValueError(f"t5 features must have shape (L, d_model), got {tuple(t.shape)}")
    t = t.detach().cpu().to(getattr(torch, dtype)).contiguous()
    if dtype == "bfloat16":
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def t5_from_numpy(arr: np.ndarray, dtype: str):
    import torch

    if dtype == "bfloat16":
        if arr.dtype != np.uint16:
            raise ShardFormatError(f"bfloat16 T5 features must be stored as uint16 bits, got {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
    if dtype == "float16":
        if arr.dtype != np.float16:
            raise ShardFormatError(f"float16 T5 features stored as {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise ShardFormatError(f"unknown T5 dtype {dtype!r}")


def encode_sample(index: int | str, codes: Any, label: int | None = None, caption: str | None = None,
                  t5: Any = None, t5_dtype: str = "bfloat16", codebook_size: int | None = None) -> dict[str, bytes]:
    """One sample's tar members {"__key__": ..., "codes.npy": ..., "cls"|"txt": ..., ["t5.npy"]} (values are bytes)."""
    members: dict[str, Any] = {"__key__": sample_key(index), "codes.npy": _npy_bytes(codes_to_uint16(codes, codebook_size))}
    if label is not None:
        members["cls"] = str(int(label)).encode()
    if caption is not None:
        members["txt"] = caption.encode("utf-8")
    if t5 is not None:
        members["t5.npy"] = _npy_bytes(t5_to_numpy(t5, t5_dtype))
    return members


@dataclass
class Sample:
    key: str
    codes: np.ndarray                # uint16 (n_aug, grid*grid)
    label: int | None = None
    caption: str | None = None
    t5: Any = None                   # torch tensor (L, D) in bfloat16/float16, or None

    @property
    def index(self) -> int:
        """The source index (integer keys); string keys (img2dataset) raise ValueError."""
        return int(self.key)


def decode_sample(members: dict[str, Any], t5_dtype: str | None = "bfloat16",
                  expect_shape: tuple[int, int] | None = None) -> Sample:
    """Inverse of encode_sample. `members` may come from read_shard or from webdataset (bytes values)."""
    key = members.get("__key__")
    if key is None or "codes.npy" not in members:
        raise ShardFormatError(f"sample {key!r} has no codes.npy member (members: {sorted(members)})")
    codes = _npy_load(members["codes.npy"], f"codes of sample {key}")
    if codes.dtype != np.uint16 or codes.ndim != 2:
        raise ShardFormatError(f"sample {key}: codes must be uint16 (n_aug, T), got {codes.dtype} {codes.shape}")
    if expect_shape is not None and tuple(codes.shape) != tuple(expect_shape):
        raise ShardFormatError(f"sample {key}: codes shape {codes.shape}, manifest says {tuple(expect_shape)}")
    label = int(bytes(members["cls"]).decode()) if "cls" in members else None
    caption = bytes(members["txt"]).decode("utf-8") if "txt" in members else None
    t5 = None
    if "t5.npy" in members:
        t5 = t5_from_numpy(_npy_load(members["t5.npy"], f"t5 of sample {key}"), t5_dtype or "bfloat16")
    return Sample(key=str(key), codes=codes, label=label, caption=caption, t5=t5)


# ------------------------------------------------------------------------------------------------- manifest

@dataclass
class ShardInfo:
    name: str
    num_samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    tokenizer: dict
    codebook_size: int
    image_size: int
    grid: int
    augmentations: list[str]
    conditioning: str = "class"                      # "class" | "caption"
    num_classes: int | None = None
    t5: dict | None = None
    compression: str = "gzip"
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    created_by: str = ""
    format_version: int = FORMAT_VERSION
    num_samples: int = 0

    def __post_init__(self) -> None:
        self.shards = [s if isinstance(s, ShardInfo) else ShardInfo(**s) for s in self.shards]
        if not self.num_samples:
            self.num_samples = sum(s.num_samples for s in self.shards)

    @property
    def n_aug(self) -> int:
        return len(self.augmentations)

    @property
    def seq_len(self) -> int:
        return self.grid * self.grid

    @property
    def codes_shape(self) -> tuple[int, int]:
        return (self.n_aug, self.seq_len)

    @property
    def t5_dtype(self) -> str | None:
        return self.t5["dtype"] if self.t5 else None

    def shard_urls(self, prefix: str) -> list[str]:
        return [storage.join(prefix, s.name) for s in self.shards]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["num_samples"] = sum(s.num_samples for s in self.shards)
        order = ["format_version", "tokenizer", "codebook_size", "image_size", "grid", "augmentations",
                 "conditioning", "num_classes", "t5", "compression", "num_samples", "skipped", "converted",
                 "shards", "source", "config", "created_by"]
        return {k: d[k] for k in order}

    @classmethod
    def from_dict(cls, d: dict, where: str = "manifest") -> "Manifest":
        version = d.get("format_version")
        if not isinstance(version, int):
            raise ShardFormatError(f"{where}: no format_version; not an argen shard manifest")
        if version > FORMAT_VERSION:
            raise ShardFormatError(f"{where}: format_version {version} is newer than this argen reads "
                                   f"({FORMAT_VERSION}); upgrade argen")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except TypeError as e:
            raise ShardFormatError(f"{where}: {e}") from None


def write_manifest(url: str, m: Manifest) -> None:
    """Write manifest.json (atomically). `url` is the manifest URL or the data set prefix."""
    if not str(url).endswith(".json"):
        url = manifest_url(url)
    storage.put_bytes_atomic(url, (json.dumps(m.to_dict(), indent=1) + "\n").encode())


def read_manifest(url: str) -> Manifest:
    """Read manifest.json from its URL or from the data set prefix; clear errors for missing/partial data sets."""
    if not str(url).endswith(".json"):
        url = manifest_url(url)
    try:
        raw = storage.read_whole(url)
    except FileNotFoundError:
        prefix = str(url)[: -len(MANIFEST_NAME)].rstrip("/")
        hint = ""
        try:
            if any(n.startswith("shard-") for n in storage.list_names(prefix)):
                hint = " (shards exist: the tokenize job has not finished or was not finalized; run " \
                       "`argen tokenize CONFIG --finalize`)"
        except Exception:
            pass
        raise ArgenError(f"no manifest at {url}{hint}") from None
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ShardFormatError(f"{url}: not valid JSON ({e})") from None
    return Manifest.from_dict(d, where=str(url))


# ------------------------------------------------------------------------------------------------- shards

class ShardWriter:
    """Write one shard to a local temp file, then commit it whole to `url_prefix/shard-NNNNNN.tar[.zst|.gz]`.

        with ShardWriter(prefix, index) as w:
            for ...: w.write(encode_sample(...))
            info = w.commit()        # leaving the block without commit() (or on error) discards the shard
    """

    def __init__(self, url_prefix: str, index: int, compression: str = "gzip", tmp_dir: str | None = None,
                 compresslevel: int = 6):
        self.url = shard_url(url_prefix, index, compression)
        self.name = shard_name(index, compression)
        self.num_samples = 0
        self._keys: set[str] = set()
        fd, self._tmp = tempfile.mkstemp(prefix=f".{self.name}.", suffix=".part", dir=tmp_dir)
        self._raw: IO = os.fdopen(fd, "wb")
        self._compression = compression
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0,
                                 compresslevel=compresslevel) if compression == "gzip" else None
        self._tar = tarfile.open(fileobj=self._gz or self._raw, mode="w|", format=tarfile.GNU_FORMAT)
        self._closed = False

    def write(self, members: dict[str, bytes]) -> None:
        key = members["__key__"]
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key} in {self.name}")
        self._keys.add(key)
        for ext, data in members.items():
            if ext == "__key__":
                continue
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o444, 0, 0
            self._tar.addfile(info, io.BytesIO(data))
        self.num_samples += 1

    def _close(self) -> None:
        if not self._closed:
            self._tar.close()
            if self._gz is not None:
                self._gz.close()
            self._raw.close()
            self._closed = True

    def _zstd_in_place(self) -> None:
        """Compress the finished tar as one zstd frame that records its size, so a reader inflates it into one
        buffer of the right size (a streamed frame does not know its size)."""
        packed = self._tmp + ".zst"
        try:
            with open(self._tmp, "rb") as src, open(packed, "wb") as dst:
                zstandard.ZstdCompressor(level=3, write_checksum=True).copy_stream(
                    src, dst, size=os.path.getsize(self._tmp))
            os.replace(packed, self._tmp)
        finally:
            if os.path.exists(packed):
                os.remove(packed)

    def commit(self) -> ShardInfo:
        """Close, checksum and upload/rename in one atomic step; returns the shard's manifest entry."""
        self._close()
        try:
            if self._compression == "zstd":
                self._zstd_in_place()  # only committed shards are compressed: abort() just deletes the tar
            info = ShardInfo(name=self.name, num_samples=self.num_samples, bytes=os.path.getsize(self._tmp),
                             sha256=storage.sha256_file(self._tmp))
            storage.put_file_atomic(self._tmp, self.url)
        finally:
            self.abort()
        return info

    def abort(self) -> None:
        self._close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.abort()


def iter_tar_samples(fileobj: IO, where: str = "shard") -> Iterator[dict[str, bytes]]:
    """Group the members of a tar stream (plain or gzip; a zstd stream must be wrapped in a zstandard stream_reader
    first, as _decode_stream does) into sample dicts {"__key__", ext: bytes}."""
    current: dict[str, bytes] | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                if "." not in base:
                    raise ShardFormatError(f"{where}: member {member.name!r} has no extension")
                key, ext = base.split(".", 1)
                data = tar.extractfile(member).read()
                if current is not None and current["__key__"] != key:
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key}
                current[ext] = data
    except (tarfile.TarError, EOFError, OSError, gzip.BadGzipFile, zstandard.ZstdError) as e:
        raise ShardFormatError(f"{where}: corrupt or truncated shard ({e})") from None
    if current is not None:
        yield current


def read_shard(url: str, t5_dtype: str | None = "bfloat16", expect_shape: tuple[int, int] | None = None,
               verify_sha256: str | None = None) -> Iterator[Sample]:
    """Decoded samples of one shard in stored order (optionally checking the whole file's sha256 first).
    Without the check the shard is streamed, so a large caption shard is never held in memory whole."""
    if verify_sha256 is not None:
        data = storage.read_whole(url)
        got = hashlib.sha256(data).hexdigest()
        if got != verify_sha256:
            raise ShardFormatError(f"{url}: sha256 {got} does not match the manifest ({verify_sha256})")
        yield from _decode_stream(io.BytesIO(data), url, t5_dtype, expect_shape)
        return
    with storage.open_url(url, "rb") as f:
        yield from _decode_stream(f, url, t5_dtype, expect_shape)


def _decode_stream(f: IO, url: str, t5_dtype: str | None, expect_shape: tuple[int, int] | None) -> Iterator[Sample]:
    stream: IO = f
    zstd = f.read(4) == _ZSTD_MAGIC   # tarfile reads plain and gzip streams itself, not zstd (before Python 3.14)
    f.seek(0)
    if zstd:
        stream = zstandard.ZstdDecompressor().stream_reader(f)
    for members in iter_tar_samples(stream, str(url)):
        yield decode_sample(members, t5_dtype, expect_shape)


def read_dataset(prefix: str, verify: bool = False) -> tuple[Manifest, Iterator[Sample]]:
    """The manifest and all samples of a data set in shard order (for tests, tools and small data sets)."""
    m = read_manifest(prefix)

    def gen() -> Iterator[Sample]:
        for s in m.shards:
            yield from read_shard(storage.join(prefix, s.name), m.t5_dtype, m.codes_shape,
                                  s.sha256 if verify else None)

    return m, gen()
