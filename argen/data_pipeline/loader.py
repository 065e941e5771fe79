"""The streaming training loader: code shards (s3:// or local) to batches, with exact resume.

API (what the training loop uses)
---------------------------------
    from argen.data_pipeline.loader import DataConfig, build_loader

    loader = build_loader(cfg.data, rank, world_size, batch_size)   # batch_size = per-rank micro-batch
    for step, batch in zip(range(start, steps), loader):            # an endless stream over epochs
        ...batch["codes"] (B, N) long, batch["labels"] (B,) long              (task c2i)
        ...batch["caption_embs"] (B, 120, D) float, ["caption_mask"] (B, 120) bool, ["valid"] (B,) bool  (t2i)
        ...batch["sample_id"], batch["epoch"], batch["aug"] (B,) long          (both; for logging and checks)
        if step % log_every == 0:
            log(loader.stats())          # samples_per_s, wait_fraction, epoch, corrupt_shards, retries, ...
    ckpt["data"] = loader.global_state_dict()   # collective when a process group exists: every rank's state
    ...
    loader.load_state_dict(ckpt["data"])        # before iterating; picks this rank's entry
    loader.close()                              # stops worker processes (also on garbage collection)

- `loader.epoch` (epoch of the next sample of the first data set), `loader.samples_per_epoch` (all ranks),
  `loader.steps_per_epoch` (batches per rank per epoch), `loader.position` (samples this rank has consumed).
- The stream never ends; the trainer decides when to stop (steps or samples). Without `drop_last` an epoch's
  samples are split over the ranks with nothing dropped or repeated, and the next epoch starts in the same batch
  where the last one ended; with `drop_last` every rank takes the same whole number of batches per epoch and the
  remainder (different samples each epoch, because the order is reshuffled) is left out, as in the reference.

Order and resume contract
-------------------------
The order is fixed by (seed, epoch, rank, world size, shuffle_buffer, mixture weights) and the manifests; it does
not depend on num_workers, nor (without drop_last) on the batch size (see sampler.py). The state counts samples: `position` (output
samples of this rank) and `consumed` per data set. Restoring it reproduces the uninterrupted run's batches exactly,
also with a different num_workers or prefetch depth, and with a different batch size the same sample sequence. A
different world size resumes at the same fraction of the epoch but not the same samples (logged as a warning).
A data set whose manifest changed since the checkpoint is refused.

Faults: a shard read that fails is retried with backoff (retry.py); confirmed-corrupt shards and undecodable
samples are skipped, logged and counted in stats(); more than `max_corrupt_shards` distinct corrupt shards stop
training with an ArgenError; a shard that stays unreadable after the retry budget is an ArgenError that names it.

Who does what: boto3 (S3) or fsspec (files) fetch each shard whole with one GET (storage.read_whole); a regular c2i
shard is located arithmetically and verified with numpy, anything else is split by a small tar header walker
(reader.py; Python's tarfile for anything unusual) and decoded by shard_format.decode_sample; torch DataLoader
worker processes read blocks (a thread does it when num_workers=0) while a small thread pool per worker prefetches the
next block's shards, and this module assembles batches in the main process in a fixed order.
"""
from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

import numpy as np
import torch

from argen.data_pipeline import shard_format, storage
from argen.data_pipeline.collate import collate
from argen.data_pipeline.reader import ReadEvents, Source, read_block
from argen.data_pipeline.retry import RetryConfig, ShardUnreadable
from argen.data_pipeline.sampler import BlockRef, EpochPlan, Mixture, schedule
from argen.errors import ArgenError

log = logging.getLogger("argen.data")

# 2: written since blocks are cut at shard boundaries. A version-1 state may come from before that change, when the
# same position named other samples, and cannot be told apart from a later one: resuming it continues at the same
# share of the epoch and says the resume may not be exact.
STATE_VERSION = 2


@dataclass
class DatasetSpec:
    url: str = ""           # data set prefix (holding manifest.json) or the manifest URL; s3://... or a path
    weight: float = 1.0     # relative share of samples drawn from this data set


@dataclass
class DataConfig:
    url: str = ""                                        # one data set; or use `mixture`
    mixture: list[DatasetSpec] = field(default_factory=list)
    task: Literal["c2i", "t2i"] = "c2i"
    seed: int = 0
    shuffle: bool = True
    shuffle_buffer: int = 4096       # minimum samples per shuffle block (whole shards; one block in memory per
                                     # block in flight)
    num_workers: int = 2             # loader processes; 0 reads in a background thread
    prefetch_blocks: int = 2         # blocks queued per worker
    drop_last: bool = False
    max_corrupt_shards: int = 16     # distinct corrupt shards tolerated before training stops
    caption_slots: int = 120         # t2i: caption features are right-aligned into this many slots
    caption_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    retry: RetryConfig = field(default_factory=RetryConfig)

    def validate(self) -> None:
        if self.url and self.mixture:
            raise ValueError("set either url (one data set) or mixture (several), not both")
        if self.shuffle_buffer < 1:
            raise ValueError("shuffle_buffer must be >= 1")
        if self.num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if self.prefetch_blocks < 1:
            raise ValueError("prefetch_blocks must be >= 1")
        if self.max_corrupt_shards < 0:
            raise ValueError("max_corrupt_shards must be >= 0")
        if self.caption_slots < 1:
            raise ValueError("caption_slots must be >= 1")
        for i, d in enumerate(self.mixture):
            if not d.url:
                raise ValueError(f"mixture[{i}].url is empty")
            if not d.weight > 0:
                raise ValueError(f"mixture[{i}].weight must be > 0, got {d.weight}")

    def datasets(self) -> list[DatasetSpec]:
        return list(self.mixture) if self.mixture else [DatasetSpec(self.url, 1.0)]


def _prefix(url: str) -> str:
    url = str(url).rstrip("/")
    return url[: -len(shard_format.MANIFEST_NAME)].rstrip("/") if url.endswith(".json") else url


def _identity(x: Any) -> Any:
    return x


class _BlockStream(torch.utils.data.IterableDataset):
    """Blocks of the read schedule; worker k of K produces schedule entries j with j % K == k.

    torch's DataLoader hands out items of an IterableDataset round-robin over its workers (in_order=True), so the
    main process receives entry 0, 1, 2, ... in schedule order whatever K is.
    """

    def __init__(self, sources, plans, mixture, position, consumed, retry, task):
        self.sources, self.plans, self.mixture = sources, plans, mixture
        self.position, self.consumed, self.retry, self.task = position, consumed, retry, task

    def blocks(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        mine = (ref for j, ref in enumerate(schedule(self.plans, self.mixture, self.position, self.consumed))
                if j % num_workers == worker)
        # The shards of this worker's next block are fetched by a thread while the current one is decoded:
        # network waits (S3) overlap the CPU work. A fetch that fails is simply redone by the retry loop.
        pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argen-fetch")
        pending: collections.deque = collections.deque()

        def submit(ref: BlockRef) -> None:
            block = self.plans[ref.component].block(ref.epoch, ref.index)
            src = self.sources[ref.component]
            pending.append((ref, block, [pool.submit(storage.read_whole, src.shard_urls[s.shard])
                                         for s in block.segments]))

        try:
            submit(next(mine))
            while pending:
                ref, block, futures = pending.popleft()
                submit(next(mine))
                try:
                    yield read_block(self.sources[ref.component], block, ref.offset, self.retry, self.task, futures)
                except ShardUnreadable as e:
                    # an error item rather than an exception: DataLoader would wrap it in a traceback-laden message
                    yield {"error": f"cannot read shard {e.url} after {e.attempts} attempts ({e.reason}); "
                                    f"check the storage service and credentials"}
                    return
        finally:
            for _, _, futures in pending:
                for f in futures:
                    f.cancel()
            pool.shutdown(wait=False, cancel_futures=True)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        return self.blocks(info.id, info.num_workers) if info else self.blocks(0, 1)


class _ThreadPrefetcher:
    """num_workers=0: one background thread reads blocks ahead into a bounded queue."""

    def __init__(self, it: Iterator[dict[str, Any]], depth: int):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True, name="argen-data-prefetch")
        self._thread.start()

    def _run(self, it: Iterator[dict[str, Any]]) -> None:
        try:
            for item in it:
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            self._q.put({"exception": e})

    def __next__(self) -> dict[str, Any]:
        while True:
            try:
                item = self._q.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("data prefetch thread died") from None
                continue
            if "exception" in item:
                raise item["exception"]
            return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class ShardLoader:
    """See the module docstring. Build it with build_loader()."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, batch_size: int):
        if not 0 <= rank < world_size:
            raise ArgenError(f"rank {rank} is outside world_size {world_size}")
        if batch_size < 1:
            raise ArgenError(f"batch_size must be >= 1, got {batch_size}")
        specs = cfg.datasets()
        if not specs[0].url:
            raise ArgenError("data.url is empty: point it at a data set written by `argen tokenize` "
                             "(a directory or s3:// prefix holding manifest.json), or set data.mixture")
        self.cfg, self.rank, self.world_size, self.batch_size = cfg, rank, world_size, batch_size
        self.sources: list[Source] = []
        for d in specs:
            prefix = _prefix(d.url)
            m = shard_format.read_manifest(prefix)
            self.sources.append(Source.from_manifest(prefix, m))
        self._check_sources()
        self.plans = [EpochPlan(s.counts, seed=cfg.seed, component=d, rank=rank, world_size=world_size,
                                block_size=cfg.shuffle_buffer, n_aug=s.n_aug, shuffle=cfg.shuffle,
                                drop_last=cfg.drop_last, batch_size=batch_size)
                      for d, s in enumerate(self.sources)]
        for s, p in zip(self.sources, self.plans):
            if p.rank_len == 0:
                need = world_size * batch_size if cfg.drop_last else world_size
                raise ArgenError(f"data set {s.url} has {p.total} samples: too few for {world_size} ranks"
                                 + (f" with drop_last and batch size {batch_size} (needs >= {need})"
                                    if cfg.drop_last else ""))
        self.weights = [d.weight for d in specs]
        self.mixture = Mixture(self.weights, cfg.seed, rank)
        self.task = cfg.task
        self.caption_dtype = getattr(torch, cfg.caption_dtype)
        # progress (the state)
        self.position = 0
        self.consumed = [0] * len(self.sources)
        # pipeline
        self._it: Any = None
        self._dl: Any = None
        self._current: list[dict[str, Any] | None] = [None] * len(self.sources)
        self._cursor = [0] * len(self.sources)
        # stats
        self._corrupt: dict[str, str] = {}
        self._totals = {"samples": 0, "batches": 0, "bad_samples": 0, "retries": 0, "wait_s": 0.0,
                        "skipped_samples": 0}
        self._win = {"t0": None, "samples": 0, "wait_s": 0.0, "bytes": 0}

    # ------------------------------------------------------------------------------------------ properties
    @property
    def samples_per_epoch(self) -> int:
        return self.plans[0].total

    @property
    def steps_per_epoch(self) -> int:
        p = self.plans[0]
        return p.max_rank_len // self.batch_size if self.cfg.drop_last else -(-p.max_rank_len // self.batch_size)

    @property
    def epoch(self) -> int:
        return self.consumed[0] // self.plans[0].rank_len

    # ------------------------------------------------------------------------------------------ checks
    def _check_sources(self) -> None:
        first = self.sources[0]
        for s in self.sources:
            if self.cfg.task == "c2i" and s.conditioning != "class":
                raise ArgenError(f"data.task is c2i but {s.url} holds {s.conditioning}-conditioned samples")
            if self.cfg.task == "t2i":
                if s.conditioning != "caption":
                    raise ArgenError(f"data.task is t2i but {s.url} holds {s.conditioning}-conditioned samples")
                if not s.t5_dtype:
                    raise ArgenError(f"data.task is t2i but {s.url} has no T5 caption features; tokenize with "
                                     f"T5 features enabled")
            if s.seq_len != first.seq_len:
                raise ArgenError(f"mixture data sets disagree on the code grid: {first.url} has {first.seq_len} "
                                 f"tokens per image, {s.url} has {s.seq_len}")
            if s.codebook_size != first.codebook_size:
                raise ArgenError(f"mixture data sets disagree on codebook size: {first.url} {first.codebook_size}, "
                                 f"{s.url} {s.codebook_size}")
            if s.t5_dim != first.t5_dim:
                raise ArgenError(f"mixture data sets disagree on T5 feature size: {first.t5_dim} vs {s.t5_dim}")

    # ------------------------------------------------------------------------------------------ pipeline
    @property
    def urls(self) -> list[str]:
        return [src.url for src in self.sources]

    def _start(self) -> None:
        stream = _BlockStream(self.sources, self.plans, self.mixture, self.position, list(self.consumed),
                              self.cfg.retry, self.task)
        self._current = [None] * len(self.sources)
        self._cursor = [0] * len(self.sources)
        self._stash = [collections.deque() for _ in self.sources]
        if self.cfg.num_workers > 0:
            # Forked workers inherit the parent's s3fs/aiohttp sessions, bound to the parent's event loop; closing
            # them in the child prints "attached to a different loop" tracebacks. Remote data sets therefore start
            # their workers from a clean forkserver process (a second or two each time the loader starts: the first
            # batch, and after load_state_dict).
            remote = any(storage.is_remote(u) for u in self.urls)
            self._dl = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                                   prefetch_factor=self.cfg.prefetch_blocks,
                                                   collate_fn=_identity, persistent_workers=False,
                                                   multiprocessing_context="forkserver" if remote else None)
            self._it = iter(self._dl)
        else:
            self._it = _ThreadPrefetcher(stream.blocks(0, 1), self.cfg.prefetch_blocks)

    def close(self) -> None:
        it, self._it, self._dl = self._it, None, None
        if isinstance(it, _ThreadPrefetcher):
            it.close()
        elif it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def _next_block(self, d: int) -> dict[str, Any]:
        # Blocks arrive in order of first need; a batch is assembled one data set at a time, so blocks of the
        # other data sets that arrive first wait here (at most a few per data set).
        while not self._stash[d]:
            item = next(self._it)
            if "error" in item:
                self.close()
                raise ArgenError(item["error"])
            self._stash[item["component"]].append(item)
        item = self._stash[d].popleft()
        e, b, off = self.plans[d].locate(self.consumed[d])
        if (item["component"], item["epoch"], item["block"], item["offset"]) != (d, e, b, off):
            raise RuntimeError(f"loader schedule out of step: expected block {(d, e, b, off)}, got "
                               f"{(item['component'], item['epoch'], item['block'], item['offset'])}")
        self._account(item["events"])
        meta = item.pop("meta").numpy()       # columns packed by reader.read_block
        item["labels"], item["sample_id"], item["aug"], item["feat_lens"] = meta[:, 0], meta[:, 2], meta[:, 3], meta[:, 4]
        item["present_np"] = meta[:, 1].astype(bool)
        item["n"] = len(meta)
        return item

    def _account(self, ev: ReadEvents) -> None:
        t = self._totals
        t["bad_samples"] += ev.bad_samples
        t["retries"] += ev.retries
        self._win["bytes"] += ev.bytes
        for url, reason in ev.corrupt:
            if url not in self._corrupt:  # logged here, not in the worker, so it lands in the trainer's log
                log.error("skipping corrupt shard %s (%s); %d corrupt so far, limit %d", url, reason,
                          len(self._corrupt) + 1, self.cfg.max_corrupt_shards)
            self._corrupt.setdefault(url, reason)
        if ev.bad_samples:
            log.warning("dropped %d undecodable sample(s) in block %s of %s", ev.bad_samples, ev.block,
                        ev.url)
        if len(self._corrupt) > self.cfg.max_corrupt_shards:
            listing = "; ".join(f"{u}: {r}" for u, r in list(self._corrupt.items())[:5])
            self.close()
            raise ArgenError(f"{len(self._corrupt)} corrupt shards (more than data.max_corrupt_shards="
                             f"{self.cfg.max_corrupt_shards}); the data set needs re-tokenizing. First ones: "
                             f"{listing}")

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        if self._win["t0"] is None:
            self._win["t0"] = t0
        if self._it is None:
            self._start()
        items: list[dict[str, Any]] = []
        ids: dict[int, int] = {}
        pieces: list[tuple[int, np.ndarray, np.ndarray]] = []
        filled = 0
        while filled < self.batch_size:
            need = self.batch_size - filled
            choices = self.mixture.choices(self.position, need)
            chunk: list[tuple[np.ndarray, int, np.ndarray]] = []    # (positions in chunk, item, rows), present only
            for d in range(len(self.sources)):
                where = np.flatnonzero(choices == d) if len(self.sources) > 1 else np.arange(need)
                taken = 0
                while taken < len(where):
                    item = self._current[d]
                    if item is None or self._cursor[d] >= item["n"]:
                        item = self._current[d] = self._next_block(d)
                        self._cursor[d] = 0
                    cur = self._cursor[d]
                    m = min(len(where) - taken, item["n"] - cur)
                    rows, pos = np.arange(cur, cur + m), where[taken:taken + m]
                    present = item["present_np"][cur:cur + m]
                    if not present.all():                     # skipped (corrupt) samples: the next ones move up
                        self._totals["skipped_samples"] += int((~present).sum())
                        rows, pos = rows[present], pos[present]
                    if len(rows):
                        k = ids.setdefault(id(item), len(items))
                        if k == len(items):
                            items.append(item)
                        chunk.append((pos, k, rows))
                    self._cursor[d] += m
                    self.consumed[d] += m
                    taken += m
            self.position += need
            if chunk:  # batch slots follow the output positions, whatever data set each came from
                allpos = np.concatenate([c[0] for c in chunk])
                rank = np.empty(len(allpos), dtype=np.int64)
                rank[np.argsort(allpos, kind="stable")] = np.arange(len(allpos))
                off = 0
                for pos, k, rows in chunk:
                    pieces.append((k, rows, filled + rank[off:off + len(pos)]))
                    off += len(pos)
                filled += len(allpos)
        batch = collate(items, pieces, self.batch_size, self.task, self.cfg.caption_slots, self.caption_dtype)
        waited = time.perf_counter() - t0
        self._totals["wait_s"] += waited
        self._totals["samples"] += self.batch_size
        self._totals["batches"] += 1
        self._win["wait_s"] += waited
        self._win["samples"] += self.batch_size
        return batch

    # ------------------------------------------------------------------------------------------ metrics
    def stats(self, reset: bool = True) -> dict[str, float]:
        """Loader metrics since the previous stats() call (window) plus totals.

        samples_per_s: samples this rank delivered per wall-clock second in the window;
        wait_fraction: share of the window the training loop spent blocked inside next(loader) (0 = data was
        always ready; the rest of the time is the loop's own work); read_MBps: storage bytes per second in the
        window; corrupt_shards, bad_samples, skipped_samples, retries: running totals; epoch, position: progress.
        """
        now = time.perf_counter()
        t0 = self._win["t0"] if self._win["t0"] is not None else now
        span = max(now - t0, 1e-9)
        out = {
            "samples_per_s": self._win["samples"] / span if self._win["samples"] else 0.0,
            "wait_fraction": min(1.0, self._win["wait_s"] / span) if self._win["samples"] else 0.0,
            "wait_s": self._win["wait_s"],
            "read_MBps": self._win["bytes"] / span / 1e6 if self._win["samples"] else 0.0,
            "epoch": float(self.epoch),
            "position": float(self.position),
            "samples": float(self._totals["samples"]),
            "batches": float(self._totals["batches"]),
            "corrupt_shards": float(len(self._corrupt)),
            "bad_samples": float(self._totals["bad_samples"]),
            "skipped_samples": float(self._totals["skipped_samples"]),
            "retries": float(self._totals["retries"]),
        }
        if reset:
            self._win = {"t0": now, "samples": 0, "wait_s": 0.0, "bytes": 0}
        return out

    # ------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """This rank's position (plain Python values: safe in any checkpoint)."""
        return {
            "version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
            "position": self.position, "consumed": list(self.consumed),
            "seed": self.cfg.seed, "shuffle": self.cfg.shuffle, "shuffle_buffer": self.cfg.shuffle_buffer,
            "drop_last": self.cfg.drop_last, "weights": list(self.weights), "task": self.task,
            "batch_size": self.batch_size,
            "datasets": [{"url": s.url, "fingerprint": s.fingerprint, "num_samples": sum(s.counts)}
                         for s in self.sources],
        }

    def global_state_dict(self) -> dict[str, Any]:
        """Every rank's state_dict (an all_gather when a process group is up), for the checkpoint of any rank."""
        mine = self.state_dict()
        import torch.distributed as dist

        if self.world_size > 1 and dist.is_available() and dist.is_initialized():
            states: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(states, mine)
            ranks = {s["rank"]: s for s in states}
            return {"version": STATE_VERSION, "ranks": [ranks[r] for r in sorted(ranks)]}
        return {"version": STATE_VERSION, "ranks": [mine]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict() or global_state_dict(); stops any running workers first."""
        if "ranks" in state:
            by_rank = {s["rank"]: s for s in state["ranks"]}
            state = by_rank.get(self.rank) or by_rank[min(by_rank)]
        if state.get("version", 0) > STATE_VERSION:
            raise ArgenError(f"data loader state version {state.get('version')} is newer than this argen reads")
        saved = state["datasets"]
        if len(saved) != len(self.sources):
            raise ArgenError(f"the checkpoint's data loader read {len(saved)} data set(s), the config names "
                             f"{len(self.sources)}; resume with the same data.url/data.mixture")
        for s, old in zip(self.sources, saved):
            if s.fingerprint != old["fingerprint"]:
                raise ArgenError(f"data set {s.url} changed since the checkpoint (shard list fingerprint "
                                 f"{old['fingerprint']} -> {s.fingerprint}; was {old['url']})")
        inexact = [k for k, now in (("seed", self.cfg.seed), ("shuffle", self.cfg.shuffle),
                                    ("shuffle_buffer", self.cfg.shuffle_buffer), ("drop_last", self.cfg.drop_last),
                                    ("weights", list(self.weights)))
                   if state[k] != now]
        if state.get("version", 0) < STATE_VERSION:
            inexact.append(f"the block layout (state version {state.get('version', 0)}, this argen writes "
                           f"{STATE_VERSION})")
        position, consumed = int(state["position"]), [int(c) for c in state["consumed"]]
        if state["world_size"] != self.world_size:
            inexact.append("world_size")
            old_w = int(state["world_size"])
            position = position * old_w // self.world_size
            consumed = [c * old_w // self.world_size for c in consumed]
        if inexact:
            log.warning("data loader resume is not exact: %s changed since the checkpoint; continuing at the same "
                        "share of the epoch", ", ".join(k if " " in k else f"data.{k}" for k in inexact))
        self.close()
        self.position, self.consumed = position, consumed
        self._current = [None] * len(self.sources)
        self._cursor = [0] * len(self.sources)


def build_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, batch_size: int = 1) -> ShardLoader:
    """The training loader for this data-parallel rank (see the module docstring)."""
    return ShardLoader(cfg, rank, world_size, batch_size)
