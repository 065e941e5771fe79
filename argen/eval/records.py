"""Result records, claims and `results.jsonl` of a run's evaluations, on any fsspec filesystem (local or s3://).

Layout under RUN_DIR/eval/:

    results/NAME/TAG.json        one record per evaluated export (TAG = step-00001000 or step-00001000-ema);
                                 created exclusively, so it exists at most once and is the source of truth
    locks/NAME/TAG.lock.GEN      claims: GEN 0 is the first claim; a claim whose holder stopped heartbeating
                                 (or failed) is taken over by creating GEN+1, which only one watcher can do
    results.jsonl                one line per record (all NAMEs), sorted; rebuilt after every new record
    metrics.png                  metrics against training step

Only create-exclusive writes decide anything: `os.link` of a complete temp file locally, `If-None-Match: *` puts
(s3fs mode "xb") on object stores. No lock is ever deleted, so a slow watcher cannot remove a newer claim.
Staleness compares the holder's heartbeat time with the reader's clock: keep --lock-ttl well above clock skew.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import fsspec

from argen.errors import ArgenError

TAG_RE = re.compile(r"^step-(\d+)(?:-([A-Za-z0-9_]+))?$")
LOCK_RE = re.compile(r"\.lock\.(\d+)$")


class ExistsError(Exception):
    """A create-exclusive write found the path taken."""


class Store:
    """The few filesystem operations the watcher needs, over fsspec."""

    def __init__(self, url: str):
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def url_of(self, path: str) -> str:
        return path if self.local else self.fs.unstrip_protocol(path)

    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache()  # other watchers write here: never answer from a cached listing
        return self.fs.exists(path)

    def read_json(self, path: str) -> dict | None:
        """The parsed file, None if absent, {} if unreadable (e.g. caught mid-rewrite on a store without atomic
        overwrite)."""
        self.fs.invalidate_cache()
        for attempt in range(3):
            try:
                return json.loads(self.fs.cat_file(path))  # one GET: no etag check against a racing rewrite
            except FileNotFoundError:
                return None
            except (json.JSONDecodeError, UnicodeDecodeError):
                return {}
            except OSError:  # e.g. s3fs FileExpired when a heartbeat replaced the object under us
                time.sleep(0.05 * (attempt + 1))
        return {}

    def glob(self, pattern: str) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(self.fs.glob(pattern))

    def create_exclusive(self, path: str, data: bytes) -> None:
        """Write `data` to `path` only if nothing is there; raise ExistsError otherwise. Readers never see a
        partial file: locally a complete temp file is hard-linked into place, remotely the put is one request."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise ExistsError(path) from None
            finally:
                os.unlink(tmp)
            return
        try:
            with self.fs.open(path, "xb") as f:
                f.write(data)
        except FileExistsError:
            raise ExistsError(path) from None
        except OSError as e:  # s3fs reports a failed If-None-Match as an OSError about pre-conditions (412)
            msg = str(e).lower().replace("-", "")
            if "precondition" in msg or "412" in msg:
                raise ExistsError(path) from None
            raise

    def replace(self, path: str, data: bytes) -> None:
        """Overwrite atomically (readers see the old or the new content)."""
        if self.local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def put_file(self, local: str | Path, path: str) -> None:
        if self.local:
            self.replace(path, Path(local).read_bytes())
        else:
            self.fs.put_file(str(local), path)


@dataclass
class Export:
    tag: str          # directory name, e.g. step-00001000 or step-00001000-ema
    step: int
    variant: str      # "" or e.g. "ema"
    path: str         # path on the store


def list_exports(store: Store) -> list[Export]:
    """Complete exports (config.json present: it is written last), oldest step first."""
    out = []
    for cfg in store.glob(store.path("exports", "step-*", "config.json")):
        tag = cfg.rstrip("/").split("/")[-2]
        m = TAG_RE.match(tag)
        if m:
            out.append(Export(tag, int(m.group(1)), m.group(2) or "", cfg.rsplit("/", 1)[0]))
    return sorted(out, key=lambda e: (e.step, e.variant))


def _now() -> float:
    return time.time()


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _lock_body(owner: str, gen: int, state: str, created: float, **extra) -> bytes:
    return json.dumps({"owner": owner, "gen": gen, "state": state, "created": created, "heartbeat": _now(),
                       **extra}).encode()


class Claim:
    """A held claim on one export; heartbeats in a thread until released."""

    def __init__(self, store: Store, path: str, gen: int, owner: str, heartbeat_s: float, created: float):
        self.store, self.path, self.gen, self.owner, self.created = store, path, gen, owner, created
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(heartbeat_s,), daemon=True)
        self._thread.start()

    def _content(self, state: str, **extra) -> bytes:
        return _lock_body(self.owner, self.gen, state, self.created, **extra)

    def _beat(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.store.replace(self.path, self._content("running"))
            except Exception:  # a missed heartbeat only risks a takeover, never a wrong result
                pass

    def release(self, state: str, **extra) -> None:
        self._stop.set()
        self._thread.join()
        self.store.replace(self.path, self._content(state, **extra))


class Records:
    """Records and claims of one evaluation NAME in RUN_DIR/eval/."""

    def __init__(self, store: Store, name: str = "default", lock_ttl: float = 1800, max_attempts: int = 3):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ArgenError(f"evaluation name must be letters, digits, '.', '_' or '-', got '{name}'")
        self.store, self.name, self.lock_ttl, self.max_attempts = store, name, lock_ttl, max_attempts
        self.owner = owner_id()

    def result_path(self, tag: str) -> str:
        return self.store.path("eval", "results", self.name, f"{tag}.json")

    def has_result(self, tag: str) -> bool:
        return self.store.exists(self.result_path(tag))

    def _locks(self, tag: str) -> list[tuple[int, str]]:
        found = self.store.glob(self.store.path("eval", "locks", self.name, f"{tag}.lock.*"))
        gens = [(int(m.group(1)), p) for p in found if (m := LOCK_RE.search(p))]
        return sorted(gens)

    def claim_state(self, tag: str) -> tuple[str, int]:
        """('free'|'held'|'gave-up', next generation to create)."""
        locks = self._locks(tag)
        if not locks:
            return "free", 0
        gen, path = locks[-1]
        info = self.store.read_json(path)
        if info is None:  # vanished between list and read: someone is rewriting it; look again next pass
            return "held", gen + 1
        if not info:  # unreadable: judge by the object's own modification time instead of its heartbeat
            try:
                info = {"state": "running", "heartbeat": self.store.fs.modified(path).timestamp()}
            except Exception:
                return "held", gen + 1
        state, beat = info.get("state", "running"), float(info.get("heartbeat", 0))
        if state == "running" and _now() - beat < self.lock_ttl:
            return "held", gen + 1
        if state == "done":
            return "held", gen + 1  # the result file is on its way (or was lost: no rerun without an operator)
        if gen + 1 >= self.max_attempts:
            return "gave-up", gen + 1
        return "free", gen + 1

    def try_claim(self, tag: str) -> Claim | None:
        if self.has_result(tag):
            return None
        state, gen = self.claim_state(tag)
        if state != "free":
            return None
        path = self.store.path("eval", "locks", self.name, f"{tag}.lock.{gen}")
        owner, created = self.owner, _now()
        try:
            self.store.create_exclusive(path, _lock_body(owner, gen, "running", created))
        except ExistsError:
            return None
        try:
            if self.has_result(tag):  # finished by a watcher that held the previous claim
                self.store.replace(path, _lock_body(owner, gen, "done", created))
                return None
            return Claim(self.store, path, gen, owner, heartbeat_s=max(self.lock_ttl / 6, 0.05), created=created)
        except BaseException as e:  # e.g. SIGTERM right after the claim was created: do not leave it to go stale
            self.store.replace(path, _lock_body(owner, gen, "interrupted", created,
                                                error=f"{type(e).__name__}: {e}"))
            raise

    def write_result(self, tag: str, record: dict) -> bool:
        """Store the record unless another watcher already did; True if ours is the one kept."""
        try:
            self.store.create_exclusive(self.result_path(tag), json.dumps(record, indent=1).encode())
            return True
        except ExistsError:
            return False

    def all_records(self) -> list[dict]:
        """Every record of every evaluation name in the run, sorted by (name, step, variant)."""
        out = []
        for p in self.store.glob(self.store.path("eval", "results", "*", "*.json")):
            rec = self.store.read_json(p)
            if rec:
                out.append(rec)
        return sorted(out, key=lambda r: (r.get("name", ""), r.get("step", 0), r.get("variant", "")))

    def rebuild_jsonl(self, max_rounds: int = 20) -> list[dict]:
        """Rewrite results.jsonl from the records, then re-list and repeat until the listing is unchanged.

        Every watcher does this after writing its record, so the last writer always wrote a listing that holds
        every record written before it checked: concurrent rebuilds cannot lose a line.
        """
        path = self.store.path("eval", "results.jsonl")
        records = self.all_records()
        for _ in range(max_rounds):
            text = "".join(json.dumps(r) + "\n" for r in records).encode()
            try:
                current = self.store.fs.cat_file(path)
            except FileNotFoundError:
                current = None
            if current != text:  # cron passes with nothing new leave the file (and its readers) alone
                self.store.replace(path, text)
            again = self.all_records()
            if again == records:
                return records
            records = again
        return records
