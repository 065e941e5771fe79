"""Reading one planned block: its shard segments through fsspec, decoded, permuted, one augmentation per sample.

Runs inside loader workers (or the prefetch thread). The tar parsing is `tarfile` in stream mode, as in
webdataset's tariterators, but the sample grouping is ours: a block needs samples [lo, hi) of a shard, so members
before `lo` are passed over without being decoded and reading stops at `hi` (a shard read for a block at its end
costs only its prefix). Decoding of members is shard_format.decode_sample, the format's one reader.
"""
from __future__ import annotations

import logging
import tarfile
import time
from dataclasses import dataclass, field
from typing import IO, Any

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
    read_s: float = 0.0


class _CountingReader:
    """File wrapper that counts the bytes pulled from storage."""

    def __init__(self, f: IO):
        self.f, self.n = f, 0

    def read(self, size: int = -1) -> bytes:
        b = self.f.read(size)
        self.n += len(b)
        return b


def _read_segment(url: str, seg: Segment, counter: list[int]) -> list[dict[str, bytes]]:
    """Members of samples [seg.lo, seg.hi) of one shard, grouped per sample, in stored order."""
    out: list[dict[str, bytes]] = []
    index = -1
    key = None
    current: dict[str, bytes] | None = None
    with storage.open_url(url, "rb") as raw:
        f = _CountingReader(raw)
        try:
            with tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base = member.name.rsplit("/", 1)[-1]
                    if "." not in base:
                        raise CorruptShard(f"member {member.name!r} has no extension")
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
                        current[ext] = tar.extractfile(member).read()
        finally:
            counter[0] += f.n
    if current is not None:
        out.append(current)
    if len(out) != seg.hi - seg.lo:
        raise CorruptShard(f"shard ends after {index + 1} samples; the manifest promises at least {seg.hi}")
    return out


def read_block(src: Source, block: Block, offset: int, retry: RetryConfig, task: str) -> dict[str, Any]:
    """The block's samples from `offset` on, as columns of tensors (see loader.py for the fields)."""
    t0 = time.perf_counter()
    ev = ReadEvents(url=src.url, block=f"(epoch {block.epoch}, block {block.index})")
    members: list[dict[str, bytes] | None] = []
    for seg in block.segments:
        url = src.shard_urls[seg.shard]
        counter = [0]

        def note(reason: str) -> None:
            ev.retries += 1

        try:
            members.extend(read_with_retry(url, lambda: _read_segment(url, seg, counter), retry, on_retry=note))
        except ShardCorrupt as e:
            log.debug("skipping %d samples of corrupt shard %s: %s", seg.hi - seg.lo, url, e.reason)
            ev.corrupt.append((url, e.reason))
            members.extend([None] * (seg.hi - seg.lo))
        ev.bytes += counter[0]

    order = block.order[offset:]
    n = len(order)
    codes = np.zeros((n, src.seq_len), dtype=np.int32)
    present = np.zeros(n, dtype=bool)
    labels = np.full(n, -1, dtype=np.int64)
    feat_lens = np.zeros(n, dtype=np.int32)
    feats: list[torch.Tensor] = []
    for k in range(n):
        m = members[order[k]]
        if m is None:
            continue
        try:
            s = shard_format.decode_sample(m, src.t5_dtype, (src.n_aug, src.seq_len))
            row = s.codes[block.augs[offset + k]]
            if row.size and int(row.max()) >= src.codebook_size:
                raise CorruptShard(f"codes up to {int(row.max())} but the codebook has {src.codebook_size}")
            if task == "c2i" and s.label is None:
                raise CorruptShard("no class label (.cls member)")
        except Exception as e:  # one undecodable sample is dropped and counted, the rest of the block is kept
            if isinstance(e, (TypeError, AttributeError, NameError)):
                raise
            ev.bad_samples += 1
            log.debug("dropping sample %s of %s: %s", m.get("__key__"), src.url, e)
            continue
        codes[k] = row
        present[k] = True
        if s.label is not None:
            labels[k] = s.label
        if task == "t2i" and s.t5 is not None:
            t5 = s.t5
            if src.t5_dim is not None and (t5.ndim != 2 or t5.shape[1] != src.t5_dim):
                ev.bad_samples += 1
                present[k] = False
                continue
            feats.append(t5)
            feat_lens[k] = t5.shape[0]
    ev.read_s = time.perf_counter() - t0
    item: dict[str, Any] = {
        "component": block.component, "epoch": block.epoch, "block": block.index, "offset": offset,
        "codes": torch.from_numpy(codes), "labels": torch.from_numpy(labels), "present": torch.from_numpy(present),
        "sample_id": torch.from_numpy(np.ascontiguousarray(block.sample_ids[offset:])),
        "aug": torch.from_numpy(np.ascontiguousarray(block.augs[offset:])),
        "events": ev,
    }
    if task == "t2i":
        dim = src.t5_dim or (feats[0].shape[1] if feats else 0)
        item["feat_lens"] = torch.from_numpy(feat_lens)
        item["feats"] = torch.cat(feats) if feats else torch.zeros((0, dim), dtype=torch.bfloat16)
    return item
