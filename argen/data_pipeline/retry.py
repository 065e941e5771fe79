"""Retrying shard reads: transient storage errors back off and retry; corruption is confirmed, then skipped.

The two failure kinds look alike from inside a tar parser: a server restart in the middle of a GET shows up as a
truncated stream, exactly like a truncated file. So no error is trusted on its first sighting:

- a *corrupt-looking* error (tar/gzip/zstd/npy format errors, fewer samples than the manifest says) is read again
  from scratch; only when `confirm_reads` independent reads all fail that way is the shard declared corrupt (the
  caller skips it and counts it);
- a sample that parses but does not decode, or whose codes lie outside the codebook, is no error here: the reader
  drops that sample and counts it in bad_samples, keeping the rest of the shard;
- any other error (connection refused or reset, timeouts, 5xx, s3fs/aiohttp/botocore errors, a missing object) is
  retried with exponential backoff and jitter up to `max_attempts`; a shard that still cannot be read is reported
  as unreadable, which the loader turns into a clear ArgenError (a missing object counts as corrupt instead: it is
  a data set problem, not a service problem).
"""
from __future__ import annotations

import gzip
import logging
import random
import tarfile
import time
import zlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import zstandard

from argen.data_pipeline.shard_format import ShardFormatError

log = logging.getLogger("argen.data")
T = TypeVar("T")


@dataclass
class RetryConfig:
    max_attempts: int = 8          # reads of one shard segment before giving up on a transient error
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 10.0
    confirm_reads: int = 2         # independent reads that must all look corrupt before a shard is skipped

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.confirm_reads < 1:
            raise ValueError("confirm_reads must be >= 1")
        if self.initial_backoff_s < 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError("need 0 <= initial_backoff_s <= max_backoff_s")


class CorruptShard(Exception):
    """The shard's bytes are wrong (raised by the reader for malformed tar headers or members, and for a shard with
    fewer samples than the manifest promises)."""


class ShardCorrupt(Exception):
    """Confirmed corruption: every read of the shard failed the same way."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class ShardUnreadable(Exception):
    """Transient errors outlasted the retry budget."""

    def __init__(self, url: str, attempts: int, reason: str):
        super().__init__(f"{url}: still failing after {attempts} attempts: {reason}")
        self.url, self.attempts, self.reason = url, attempts, reason


_CORRUPT_TYPES = (CorruptShard, ShardFormatError, tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error,
                  zstandard.ZstdError, UnicodeDecodeError)


def is_corrupt_looking(exc: BaseException) -> bool:
    return isinstance(exc, _CORRUPT_TYPES)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def read_with_retry(url: str, read: Callable[[], T], cfg: RetryConfig, on_retry: Callable[[str], None] | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `read()` (one complete, from-scratch read of a shard segment) until it succeeds; see the module doc."""
    corrupt_seen = 0
    transient_seen = 0
    while True:
        try:
            return read()
        except FileNotFoundError as e:
            transient_seen += 1
            if transient_seen >= cfg.max_attempts:
                raise ShardCorrupt(url, f"object missing ({e})") from None
            reason = _describe(e)
        except Exception as e:  # noqa: BLE001 - classification below; programming errors are re-raised
            if isinstance(e, (TypeError, AttributeError, NameError, AssertionError)):
                raise
            if is_corrupt_looking(e):
                corrupt_seen += 1
                if corrupt_seen >= cfg.confirm_reads:
                    raise ShardCorrupt(url, _describe(e)) from None
                reason = _describe(e)
                if on_retry:
                    on_retry(reason)
                log.warning("shard %s looks corrupt (%s); reading it again to confirm", url, reason)
                continue
            transient_seen += 1
            if transient_seen >= cfg.max_attempts:
                raise ShardUnreadable(url, transient_seen, _describe(e)) from None
            reason = _describe(e)
        delay = min(cfg.max_backoff_s, cfg.initial_backoff_s * (2 ** (transient_seen - 1)))
        delay *= 0.5 + random.random() * 0.5  # jitter: many ranks retrying at once should not stampede the server
        if on_retry:
            on_retry(reason)
        log.warning("reading %s failed (%s); retry %d/%d in %.2fs", url, reason, transient_seen,
                    cfg.max_attempts - 1, delay)
        sleep(delay)
