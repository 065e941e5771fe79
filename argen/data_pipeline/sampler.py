"""The sample order: which samples a rank sees, in which order, with which augmentation. Pure index arithmetic.

Nothing here reads data. Everything is a function of (seed, component, epoch, rank, world size) and the shard
sample counts from the manifest, so every process (the trainer, each loader worker, a resumed run) computes the
same order without talking to the others.

One epoch of one data set on one rank:

1. shard order: a permutation of the shards drawn from (seed, component, epoch) (identity when shuffle is off);
   concatenating the shards in that order gives the epoch's *stream* of T samples.
2. rank range: rank r takes the contiguous stream range [start_r, start_r + n_r). Without drop_last the ranges
   cover the stream exactly (n_r is T // W or T // W + 1), so every sample is on exactly one rank; with drop_last
   each rank takes the same multiple of the batch size and the tail of the (shuffled) stream is left out.
   Contiguous ranges keep reads sequential: a rank touches only its own shards (plus at most two shared ones).
3. blocks: the rank's part of the stream is cut into blocks of whole shard segments, each at least
   `block_size` samples (the last one of an epoch may be smaller), and each block is permuted by a permutation drawn
   from (seed, component, epoch, block start). This is the shuffle buffer. Blocks are the unit a loader worker
   reads; cutting at shard boundaries means every shard is fetched and parsed once per epoch (a shard shared by two
   ranks once per rank), and block boundaries do not depend on the number of workers: that is what makes the
   order (and resume) independent of the worker count.
4. augmentation: sample `sid` in epoch `e` uses augmentation hash(seed, component, e, sid) mod n_aug.

A rank's stream of a data set is the concatenation of its epochs; a mixture draws, at each of the rank's output
positions i, component hash(seed, i) with the configured weights, and takes that component's next sample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, vectorised; uint64 arithmetic wraps, which is what the mixer wants."""
    with np.errstate(over="ignore"):
        z = (x + _GOLDEN).astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def hash64(keys: Sequence[int], x: np.ndarray | int) -> np.ndarray:
    """A counter-based hash of (keys..., x): the same inputs give the same 64-bit value in every process."""
    h = np.uint64(0x243F6A8885A308D3)
    for k in keys:
        h = _mix64(np.asarray(h ^ np.uint64(int(k) & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
    return _mix64(np.asarray(x, dtype=np.uint64) ^ h)


def uniform01(keys: Sequence[int], x: np.ndarray) -> np.ndarray:
    return (hash64(keys, x) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


_TAG_SHARDS, _TAG_BLOCK, _TAG_AUG, _TAG_MIX = 0x5A4D, 0xB10C, 0xA116, 0x313C


@dataclass(frozen=True)
class Segment:
    """Samples [lo, hi) of shard `shard` (index into the manifest's shard list)."""
    shard: int
    lo: int
    hi: int


@dataclass(frozen=True)
class Block:
    """One block of a rank's epoch: what to read and in which order to emit it."""
    component: int
    epoch: int
    index: int
    segments: tuple[Segment, ...]   # stream order, as the shards are read
    order: np.ndarray               # emit order: indices into the concatenated segment samples
    sample_ids: np.ndarray          # int64 per emitted sample: dataset-global index (shard offset + member)
    augs: np.ndarray                # int64 per emitted sample: the augmentation row to use

    def __len__(self) -> int:
        return len(self.order)


@dataclass(frozen=True)
class _Layout:
    segments: tuple[Segment, ...]     # the rank's part of the epoch's stream, in stream order
    bounds: np.ndarray                # rank positions where blocks start (plus rank_len at the end)
    seg_of_block: np.ndarray          # index of each block's first segment (plus len(segments))


class EpochPlan:
    """The order of one component's samples on one rank, for every epoch (see the module docstring)."""

    def __init__(self, counts: Sequence[int], *, seed: int, component: int, rank: int, world_size: int,
                 block_size: int, n_aug: int = 1, shuffle: bool = True, drop_last: bool = False,
                 batch_size: int = 1):
        self.counts = np.asarray(counts, dtype=np.int64)
        if self.counts.ndim != 1 or len(self.counts) == 0 or (self.counts < 0).any():
            raise ValueError("shard sample counts must be a non-empty list of non-negative integers")
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])  # dataset-global id of each shard's first sample
        self.total = int(self.offsets[-1])
        self.seed, self.component, self.rank, self.world_size = seed, component, rank, world_size
        self.block_size, self.n_aug, self.shuffle, self.drop_last = block_size, max(1, n_aug), shuffle, drop_last
        if drop_last:
            per_rank = (self.total // (world_size * batch_size)) * batch_size
            self.rank_start, self.rank_len = rank * per_rank, per_rank
        else:
            q, rem = divmod(self.total, world_size)
            self.rank_start, self.rank_len = rank * q + min(rank, rem), q + (1 if rank < rem else 0)
        # the largest rank share: what all ranks step through per epoch
        self.max_rank_len = self.rank_len if drop_last else -(-self.total // world_size)
        self._layouts: dict[int, _Layout] = {}

    def shard_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.counts))
        rng = np.random.default_rng([self.seed, self.component, epoch, _TAG_SHARDS])
        return rng.permutation(len(self.counts))

    def layout(self, epoch: int) -> _Layout:
        lay = self._layouts.get(epoch)
        if lay is not None:
            return lay
        order = self.shard_order(epoch)
        ends = np.cumsum(self.counts[order])
        lo, hi = self.rank_start, self.rank_start + self.rank_len
        segments = []
        k = int(np.searchsorted(ends, lo, side="right"))
        pos = lo
        while pos < hi:
            shard_begin = int(ends[k] - self.counts[order[k]])
            take_hi = min(hi, int(ends[k]))
            if take_hi > pos:
                segments.append(Segment(int(order[k]), pos - shard_begin, take_hi - shard_begin))
            pos = take_hi
            k += 1
        bounds, first_seg, end = [0], [0], 0
        for i, seg in enumerate(segments):
            end += seg.hi - seg.lo
            if end - bounds[-1] >= self.block_size and end < self.rank_len:
                bounds.append(end)
                first_seg.append(i + 1)
        bounds.append(self.rank_len)
        first_seg.append(len(segments))
        lay = _Layout(tuple(segments), np.asarray(bounds, dtype=np.int64), np.asarray(first_seg, dtype=np.int64))
        if len(self._layouts) > 4:
            self._layouts.pop(min(self._layouts))
        self._layouts[epoch] = lay
        return lay

    def blocks_in(self, epoch: int) -> int:
        return len(self.layout(epoch).bounds) - 1 if self.rank_len else 0

    def block(self, epoch: int, index: int) -> Block:
        lay = self.layout(epoch)
        if not 0 <= index < len(lay.bounds) - 1:
            raise IndexError(f"block {index} out of range (epoch {epoch} has {len(lay.bounds) - 1})")
        segments = lay.segments[lay.seg_of_block[index]:lay.seg_of_block[index + 1]]
        stream_ids = np.concatenate([np.arange(s.lo, s.hi, dtype=np.int64) + self.offsets[s.shard] for s in segments])
        n = len(stream_ids)
        start = self.rank_start + int(lay.bounds[index])
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.component, epoch, start, _TAG_BLOCK]).permutation(n)
        else:
            perm = np.arange(n)
        sample_ids = stream_ids[perm]
        if self.n_aug > 1:
            augs = (hash64([self.seed, self.component, epoch, _TAG_AUG], sample_ids) % np.uint64(self.n_aug)).astype(np.int64)
        else:
            augs = np.zeros(n, dtype=np.int64)
        return Block(self.component, epoch, index, tuple(segments), perm, sample_ids, augs)

    def locate(self, consumed: int) -> tuple[int, int, int]:
        """(epoch, block, offset in block) of the rank's sample number `consumed` (counted over all epochs)."""
        epoch, pos = divmod(consumed, self.rank_len)
        bounds = self.layout(epoch).bounds
        b = int(np.searchsorted(bounds, pos, side="right")) - 1
        return epoch, b, pos - int(bounds[b])

    def block_starts(self, consumed: np.ndarray) -> np.ndarray:
        """For each count in `consumed`: is that sample the first of a block?"""
        epochs, pos = np.divmod(consumed, self.rank_len)
        out = np.zeros(len(consumed), dtype=bool)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = np.isin(pos[sel], self.layout(int(e)).bounds[:-1])
        return out


@dataclass(frozen=True)
class BlockRef:
    """An entry of the read schedule: block (component, epoch, index), starting at `offset` (non-zero on resume)."""
    component: int
    epoch: int
    index: int
    offset: int


class Mixture:
    """Which component each output position of a rank draws from; deterministic in (seed, rank, position)."""

    def __init__(self, weights: Sequence[float], seed: int, rank: int):
        w = np.asarray(weights, dtype=np.float64)
        if len(w) == 0 or (w <= 0).any() or not np.isfinite(w).all():
            raise ValueError(f"mixture weights must be positive numbers, got {list(weights)}")
        self.cum = np.cumsum(w / w.sum())
        self.cum[-1] = 1.0
        self.keys = [seed, rank, _TAG_MIX]

    def choices(self, start: int, n: int) -> np.ndarray:
        if len(self.cum) == 1:
            return np.zeros(n, dtype=np.int64)
        u = uniform01(self.keys, np.arange(start, start + n, dtype=np.uint64))
        return np.searchsorted(self.cum, u, side="right").astype(np.int64)


def schedule(plans: Sequence[EpochPlan], mixture: Mixture, position: int, consumed: Sequence[int],
             chunk: int = 1 << 16) -> Iterator[BlockRef]:
    """The blocks a rank needs from output position `position` on, in the order they are first needed.

    `consumed[d]` counts the samples already taken from component d. The first block of each component starts at
    its offset; later blocks start at 0. Order of first need is a pure function of the arguments, so every worker
    that walks this schedule agrees on which block is number j.
    """
    counts = [int(c) for c in consumed]
    started = [False] * len(plans)
    pos = position
    while True:
        ch = mixture.choices(pos, chunk)
        found: list[tuple[int, BlockRef]] = []
        for d, plan in enumerate(plans):
            where = np.flatnonzero(ch == d)
            if len(where) == 0:
                continue
            c = counts[d] + np.arange(len(where), dtype=np.int64)
            starts = plan.block_starts(c)
            if not started[d]:
                starts[0] = True
                started[d] = True
            for k in np.flatnonzero(starts):
                e, b, off = plan.locate(int(c[k]))
                found.append((int(where[k]), BlockRef(d, e, b, off)))
            counts[d] += len(where)
        found.sort(key=lambda t: t[0])
        for _, ref in found:
            yield ref
        pos += chunk

