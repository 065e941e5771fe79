"""Reading one planned block: its shards fetched whole (boto3 for S3, fsspec otherwise), split, decoded, permuted,
one augmentation per sample.

Runs inside loader workers (or the prefetch thread). A block is made of whole shard segments (sampler.py), so
each shard is fetched whole with one GET and, if compressed, inflated at C speed. A small header walker splits the tar
(the plain GNU/ustar members that ShardWriter writes, header checksums verified); anything unusual goes through
Python's tarfile, the parser webdataset's tariterators use. Grouping members into samples is ours, because a
segment is samples [lo, hi) of a shard. Decoding is shard_format.decode_sample, the format's one reader, with a
fast path for well-formed codes members. Format errors raise retry.CorruptShard-like errors, which retry.py
confirms with a second read before a shard is skipped.
"""
from __future__ import annotations

import io
import logging
import tarfile
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from argen.data_pipeline import shard_format, storage
from argen.data_pipeline.retry import CorruptShard, RetryConfig, ShardCorrupt, read_with_retry
from argen.data_pipeline.sampler import Block, Segment

log = logging.getLogger("argen.data")


@dataclass(frozen=True)
class Source:
    """What a worker needs to know about one data set (picklable; built once from the manifest)."""
    url: str
    shard_urls: tuple[str, ...]
    counts: tuple[int, ...]
    n_aug: int
    seq_len: int
    codebook_size: int
    conditioning: str              # "class" | "caption"
    t5_dtype: str | None
    t5_dim: int | None
    fingerprint: str               # identifies the shard list, for resume checks

    @classmethod
    def from_manifest(cls, url: str, m: shard_format.Manifest) -> "Source":
        import hashlib

        h = hashlib.sha256()
        for s in m.shards:
            h.update(f"{s.name}:{s.num_samples}:{s.sha256};".encode())
        return cls(url=url, shard_urls=tuple(m.shard_urls(url)), counts=tuple(s.num_samples for s in m.shards),
                   n_aug=m.n_aug, seq_len=m.seq_len, codebook_size=m.codebook_size, conditioning=m.conditioning,
                   t5_dtype=m.t5_dtype, t5_dim=(m.t5 or {}).get("dim"), fingerprint=h.hexdigest()[:16])


@dataclass
class ReadEvents:
    """What happened while reading a block; travels with the block to the main process for stats()."""
    corrupt: list[tuple[str, str]] = field(default_factory=list)   # (shard url, reason), confirmed corruption
    bad_samples: int = 0
    url: str = ""
    block: str = ""
    retries: int = 0
    bytes: int = 0


_BLOCK = 512


def _fast_members(buf: bytes) -> Iterator[tuple[str, memoryview]] | None:
    """(name, data) of a plain tar in memory, parsed without tarfile (which costs ~70 us per member).

    Handles what ShardWriter writes: regular files (and directories, skipped). Returns None when the archive uses
    anything else (long-name/pax records, base-256 sizes), and the caller falls back to tarfile. Header checksums
    are verified (vectorised, after the walk), so a garbled header is reported, never trusted. Member data are
    zero-copy views into `buf`.
    """
    n = len(buf)
    if n == 0:
        raise CorruptShard("empty shard")
    view = memoryview(buf)
    heads: list[int] = []
    out: list[tuple[str, memoryview]] = []
    off = 0
    while off + _BLOCK <= n:
        if buf[off] == 0:
            if buf.count(0, off, off + _BLOCK) == _BLOCK:
                break                                    # end-of-archive marker
            raise CorruptShard(f"tar header without a name at byte {off}")
        typeflag = buf[off + 156]
        if typeflag not in (48, 0, 53):                  # "0", NUL (regular file), "5" (directory)
            return None
        try:
            size = int(buf[off + 124:off + 135], 8)      # 11 octal digits, then NUL or space
        except ValueError:
            if buf[off + 124] & 0x80:
                return None                              # base-256 size (> 8 GiB member): leave it to tarfile
            try:
                size = int(buf[off + 124:off + 136].strip(b" \0") or b"0", 8)
            except ValueError:
                raise CorruptShard(f"garbled tar header at byte {off}") from None
        heads.append(off)
        start = off + _BLOCK
        if start + size > n:
            raise CorruptShard(f"tar member at byte {off} is truncated")
        if typeflag != 53:
            try:
                out.append((buf[off:off + 100].split(b"\0", 1)[0].decode(), view[start:start + size]))
            except UnicodeDecodeError:
                raise CorruptShard(f"garbled member name at byte {off}") from None
        off = start + -(-size // _BLOCK) * _BLOCK
    if heads:
        _verify_checksums(buf, heads)
    return iter(out)  # no end marker is fine: the sample count check of the caller decides


def _octal(fields: np.ndarray) -> np.ndarray | None:
    """Fixed-width octal tar header fields, digit columns (..., k) uint8, as integers; None if any byte is not 0-7."""
    digits = fields.astype(np.int64) - 48
    if ((digits < 0) | (digits > 7)).any():
        return None
    return digits @ (8 ** np.arange(digits.shape[-1] - 1, -1, -1))


def _verify_checksums(buf: bytes, heads: list[int]) -> None:
    arr = np.frombuffer(buf, dtype=np.uint8)
    hdrs = arr[np.asarray(heads)[:, None] + np.arange(_BLOCK)]   # (members, 512) uint8
    sums = _header_sums(hdrs)
    stored = _octal(hdrs[:, 148:154])                     # the usual "%06o\0 " field, parsed in one go
    if stored is None:
        try:
            stored = np.asarray([int(bytes(h[148:156]).strip(b" \0") or b"-1", 8) for h in hdrs])
        except ValueError:
            raise CorruptShard("garbled tar header checksum field") from None
    bad = np.flatnonzero(sums != stored)
    if len(bad):
        raise CorruptShard(f"tar header checksum mismatch at byte {heads[bad[0]]}")


def _header_sums(hdrs: np.ndarray) -> np.ndarray:
    """The tar checksum of each header row: the checksum field itself counts as eight spaces (np.add.reduceat with
    a dtype cast was 20x slower than this)."""
    return hdrs.sum(1, dtype=np.int64) - hdrs[:, 148:156].sum(1, dtype=np.int64) + 8 * 32


@dataclass
class _Regular:
    """Samples [lo, hi) of a c2i shard in the regular layout, located without walking it member by member."""
    codes: np.ndarray      # (hi - lo, n_aug, seq_len) uint16: a strided view into the shard's bytes
    labels: np.ndarray     # (hi - lo,) int64


def _regular_c2i(buf: bytes, seg: Segment, dec: "_CodesDecoder") -> _Regular | None:
    """The layout ShardWriter writes for c2i, located arithmetically: when every sample has the members of sample 0
    with the same padded sizes, sample i's headers sit at i * stride + fixed offsets. The headers of samples [0, hi)
    are then verified at once (checksum, type, name, one key per sample and a new key per sample, padded size),
    and for the segment's own samples [lo, hi) also the codes' .npy header, exact size and the label's digits. Any
    mismatch returns None and the member walker reads the shard, with its own errors for what is wrong; a match
    gives the walker's samples at numpy speed (headers past hi, which the walker would also check, are not read)."""
    n = len(buf)
    pattern: list[tuple[bytes, int, int]] = []   # sample 0: (extension, offset, size) per member
    off, key0 = 0, None
    while off + _BLOCK <= n and buf[off] != 0:
        name = buf[off:off + 100].split(b"\0", 1)[0]
        key, dot, ext = name.partition(b".")
        if not dot or not key or b"/" in name or buf[off + 156] not in (48, 0):
            return None
        if key0 is None:
            key0 = key
        elif key != key0:
            break
        try:
            size = int(buf[off + 124:off + 135], 8)
        except ValueError:
            return None
        pattern.append((ext, off, size))
        off += _BLOCK + -(-size // _BLOCK) * _BLOCK
    exts = [p[0] for p in pattern]
    stride = off
    if key0 is None or exts.count(b"codes.npy") != 1 or exts.count(b"cls") != 1 or stride * seg.hi > n:
        return None
    # every member starts on a 512-byte boundary: the shard as rows of 512 bytes, and headers are rows of it
    rows = np.frombuffer(buf, dtype=np.uint8, count=n // _BLOCK * _BLOCK).reshape(-1, _BLOCK)
    heads = np.arange(seg.hi)[:, None] * stride + np.array([p[1] for p in pattern])[None]     # (hi, members)
    hdr = rows[heads.reshape(-1) // _BLOCK]                                                     # (hi*members, 512)
    stored = _octal(hdr[:, 148:154])
    if stored is None or (stored != _header_sums(hdr)).any():
        return None
    hdr = hdr.reshape(seg.hi, len(pattern), _BLOCK)
    if not np.isin(hdr[:, :, 156], (48, 0)).all():
        return None
    klen = len(key0)
    keys = hdr[:, :, :klen]
    if not ((keys == keys[:, :1]).all() and np.isin(keys, (0, ord("."))).sum() == 0):
        return None                                               # one key per sample, no "." or NUL inside it
    if seg.hi > 1 and (keys[1:, 0] == keys[:-1, 0]).all(axis=1).any():
        return None                                               # neighbours with one key would merge
    sizes = _octal(hdr[:, :, 124:135])                                                        # (hi, members)
    if sizes is None:
        return None
    for j, (ext, _, size) in enumerate(pattern):
        tail = np.frombuffer(b"." + ext + b"\0", dtype=np.uint8)
        if not (hdr[:, j, klen:klen + len(tail)] == tail).all():
            return None
        if (-(-sizes[:, j] // _BLOCK) != -(-size // _BLOCK)).any():
            return None
    jc, jl = exts.index(b"codes.npy"), exts.index(b"cls")
    hlen = len(dec.header)
    data_rows = heads[seg.lo:] // _BLOCK + 1                     # each member's data starts one row on
    if (sizes[seg.lo:, jc] != dec.size).any() or not (
            rows[data_rows[:, jc], :hlen] == np.frombuffer(dec.header, dtype=np.uint8)).all():
        return None
    lens = sizes[seg.lo:, jl]
    width = int(lens.max(initial=0))
    if width == 0 or width > 18 or (lens == 0).any():
        return None
    label_digits = rows[data_rows[:, jl], :width].astype(np.int64) - 48
    used = np.arange(width)[None] < lens[:, None]
    if (used & ((label_digits < 0) | (label_digits > 9))).any():
        return None
    place = np.where(used, 10 ** np.maximum(lens[:, None] - 1 - np.arange(width), 0), 0)
    first = int(data_rows[0, jc]) * _BLOCK + hlen                 # sample lo's codes; the next ones every stride
    n_aug, seq_len = dec.shape
    flat = np.frombuffer(buf, dtype="<u2", offset=first, count=(n - first) // 2)
    codes = np.lib.stride_tricks.as_strided(flat, shape=(seg.hi - seg.lo, n_aug, seq_len),
                                            strides=(stride, 2 * seq_len, 2), writeable=False)
    return _Regular(codes, (label_digits * place).sum(1))


def _tarfile_members(buf: bytes) -> Iterator[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(buf), mode="r|") as tar:
        for member in tar:
            if member.isfile():
                yield member.name, tar.extractfile(member).read()


def _read_segment(url: str, seg: Segment, counter: list[int], raw: Future | None = None,
                  regular: "_CodesDecoder | None" = None) -> list[dict[str, bytes]] | _Regular:
    """Members of samples [seg.lo, seg.hi) of one shard, grouped per sample, in stored order; or, given the c2i
    codes decoder `regular`, the located samples of a regular c2i shard (_Regular).

    The shard is read whole into memory (one sequential read, or one GET on S3) and inflated at C speed;
    shards are a few MB, and blocks are cut at shard boundaries, so a block needs its shards whole. `raw` is a
    read started ahead of time (see loader._BlockStream); it is used for the first attempt only.
    """
    # a prefetched read's error is handled like any other
    buf = raw.result() if raw is not None else storage.read_whole(url)
    counter[0] += len(buf)
    buf = shard_format.decompress(buf)
    if regular is not None:
        located = _regular_c2i(buf, seg, regular)
        if located is not None:
            return located
    members = _fast_members(buf)
    if members is None:
        members = _tarfile_members(buf)
    out: list[dict[str, bytes]] = []
    index = -1
    key = None
    current: dict[str, bytes] | None = None
    for name, data in members:
        base = name.rsplit("/", 1)[-1]
        if "." not in base:
            raise CorruptShard(f"member {name!r} has no extension")
        k, ext = base.split(".", 1)
        if k != key:
            key = k
            index += 1
            if current is not None:
                out.append(current)
                current = None
            if index >= seg.hi:
                break
            if index >= seg.lo:
                current = {"__key__": k}
        if current is not None:
            current[ext] = data
    if current is not None:
        out.append(current)
    if len(out) != seg.hi - seg.lo:
        raise CorruptShard(f"shard ends after {index + 1} samples; the manifest promises at least {seg.hi}")
    return out


class _CodesDecoder:
    """Fast path for the codes member: a member whose .npy header is byte-identical to the one np.save writes for
    the manifest's shape and dtype is read as raw uint16; anything else goes through shard_format.decode_sample."""

    def __init__(self, n_aug: int, seq_len: int):
        buf = io.BytesIO()
        np.save(buf, np.zeros((n_aug, seq_len), dtype=np.uint16), allow_pickle=False)
        whole = buf.getvalue()
        self.header = whole[: len(whole) - n_aug * seq_len * 2]
        self.size = len(whole)
        self.shape = (n_aug, seq_len)


def read_block(src: Source, block: Block, offset: int, retry: RetryConfig, task: str,
               prefetched: list[Future] | None = None) -> dict[str, Any]:
    """The block's samples from `offset` on, as columns of tensors (see loader.py for the fields).

    `prefetched`: one future per segment holding the shard's bytes, from reads started while the previous block
    was being decoded (network time overlaps CPU time)."""
    ev = ReadEvents(url=src.url, block=f"(epoch {block.epoch}, block {block.index})")
    fast_codes = _CodesDecoder(src.n_aug, src.seq_len)
    parts: list[list[dict[str, bytes]] | _Regular | None] = []   # per segment; None: a confirmed-corrupt shard
    for i, seg in enumerate(block.segments):
        url = src.shard_urls[seg.shard]
        counter = [0]
        first = [prefetched[i] if prefetched else None]

        def note(reason: str) -> None:
            ev.retries += 1

        def attempt() -> list[dict[str, bytes]] | _Regular:
            raw, first[0] = first[0], None
            return _read_segment(url, seg, counter, raw, fast_codes if task == "c2i" else None)

        try:
            parts.append(read_with_retry(url, attempt, retry, on_retry=note))
        except ShardCorrupt as e:
            log.debug("skipping %d samples of corrupt shard %s: %s", seg.hi - seg.lo, url, e.reason)
            ev.corrupt.append((url, e.reason))
            parts.append(None)
        ev.bytes += counter[0]

    order = block.order[offset:]
    n = len(order)
    codes = np.zeros((n, src.seq_len), dtype=np.uint16)   # the stored dtype: half the bytes between processes
    present = np.zeros(n, dtype=bool)
    labels = np.full(n, -1, dtype=np.int64)
    feat_lens = np.zeros(n, dtype=np.int32)
    feats: list[torch.Tensor] = []
    augs_np = block.augs[offset:]
    starts = np.cumsum([0] + [seg.hi - seg.lo for seg in block.segments])
    part_of = np.searchsorted(starts, order, side="right") - 1   # output row -> its segment, and row within it
    local = order - starts[part_of]
    members: list[dict[str, bytes] | None] = [None] * n           # member-walked rows, in output order
    for i, part in enumerate(parts):
        rows = np.flatnonzero(part_of == i)
        if part is None or not len(rows):
            continue
        if isinstance(part, _Regular):
            codes[rows] = part.codes[local[rows], augs_np[rows]]
            labels[rows] = part.labels[local[rows]]
            present[rows] = True
        else:
            for k, j in zip(rows.tolist(), local[rows].tolist()):
                members[k] = part[j]
    augs = augs_np.tolist()
    fast_rows: list[int] = []
    fast_payloads: list[memoryview] = []
    hlen = len(fast_codes.header)
    for k in range(n):
        m = members[k]
        if m is None:
            continue
        if task == "c2i":
            c, cls = m.get("codes.npy"), m.get("cls")
            if c is not None and cls is not None and len(c) == fast_codes.size and c[:hlen] == fast_codes.header:
                try:
                    labels[k] = int(bytes(cls))
                except ValueError:
                    ev.bad_samples += 1
                    continue
                fast_rows.append(k)
                fast_payloads.append(c[hlen:])
                present[k] = True
                continue
        try:
            s = shard_format.decode_sample({name: v if name == "__key__" else bytes(v) for name, v in m.items()},
                                           src.t5_dtype, (src.n_aug, src.seq_len))
            row, label, t5 = s.codes[augs[k]], s.label, s.t5
            if task == "c2i" and label is None:
                raise CorruptShard("no class label (.cls member)")
        except Exception as e:  # one undecodable sample is dropped and counted, the rest of the block is kept
            if isinstance(e, (TypeError, AttributeError, NameError)):
                raise
            ev.bad_samples += 1
            log.debug("dropping sample %s of %s: %s", m.get("__key__"), src.url, e)
            continue
        codes[k] = row
        present[k] = True
        if label is not None:
            labels[k] = label
        if task == "t2i" and t5 is not None:
            if src.t5_dim is not None and (t5.ndim != 2 or t5.shape[1] != src.t5_dim):
                ev.bad_samples += 1
                present[k] = False
                continue
            feats.append(t5)
            feat_lens[k] = t5.shape[0]
    if fast_rows:
        rows = np.asarray(fast_rows)
        allcodes = np.frombuffer(b"".join(fast_payloads), dtype=np.uint16).reshape(len(rows), src.n_aug, src.seq_len)
        codes[rows] = allcodes[np.arange(len(rows)), augs_np[rows]]
    if n:  # codes outside the codebook: garbled bytes that still parse; checked once per block
        over = present & (codes.max(axis=1) >= src.codebook_size)
        if over.any():
            ev.bad_samples += int(over.sum())
            present &= ~over
    item: dict[str, Any] = {
        "component": block.component, "epoch": block.epoch, "block": block.index, "offset": offset,
        "codes": torch.from_numpy(codes),
        # one tensor for the per-sample columns: each tensor costs a shared-memory hand-over between processes
        "meta": torch.from_numpy(np.stack([labels, present.astype(np.int64), block.sample_ids[offset:],
                                           augs_np, feat_lens.astype(np.int64)], axis=1)),
        "events": ev,
    }
    if task == "t2i":
        dim = src.t5_dim or (feats[0].shape[1] if feats else 0)
        item["feats"] = torch.cat(feats) if feats else torch.zeros((0, dim), dtype=torch.bfloat16)
    return item
