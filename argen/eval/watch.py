"""`argen eval watch RUN_DIR`: score each new export of a training run exactly once, from cron or a loop.

One pass: list RUN_DIR/exports/step-*/ (complete once config.json exists), skip those with a record, claim the
rest one at a time (see records.py for the claim protocol), sample with the configured protocol, score against
the reference, store the record, rebuild RUN_DIR/eval/results.jsonl, log to wandb, redraw metrics.png. A failed
evaluation releases its claim as failed and is retried by a later pass up to --max-attempts claims.

The watcher runs in one process on one device. For a faster 50k-sample evaluation of a single checkpoint, run
`argen eval sample` under torchrun/srun and `argen eval score` instead.
"""
from __future__ import annotations

import gc
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from argen.errors import ArgenError
from argen.eval.npz import sidecar_path
from argen.eval.records import Export, Records, Store, list_exports
from argen.eval.sample import SampleProtocol


@dataclass
class WatchOptions:
    run_dir: str
    vq: str | None = None
    ref: str | None = None
    inception: str | None = None
    protocol: SampleProtocol = field(default_factory=SampleProtocol)
    captions: str | None = None
    clip: str | None = None
    name: str = "default"
    lock_ttl: float = 1800.0
    max_attempts: int = 3
    work_dir: str | None = None
    keep_samples: bool = False
    wandb: str = "auto"             # auto | online | offline | off
    wandb_project: str = "argen-eval"
    score_batch_size: int = 64


def evaluate_tokenizer(export_dir: str, opts: WatchOptions, work: Path, tag: str) -> dict:
    """A VQ export: reconstruct the reference batch and score the pairs (rFID, PSNR, SSIM, ...)."""
    from argen.eval.reconstruct import reconstruct
    from argen.eval.score import score
    if not opts.ref:
        raise ArgenError("scoring a tokenizer export needs --ref IMAGES.npz (the originals to reconstruct)")
    out = work / f"{tag}-recon.npz"
    try:
        reconstruct(export_dir, opts.ref, out, batch_size=opts.protocol.batch_size)
        result = score(out, opts.ref, inception=opts.inception, batch_size=opts.score_batch_size, paired=True)
    finally:
        if not opts.keep_samples:
            out.unlink(missing_ok=True)
            sidecar_path(out).unlink(missing_ok=True)
    return {"metrics": result["metrics"], "reference": result["reference"], "evaluator": result["evaluator"],
            "protocol": {"kind": "reconstruction"}}


def evaluate_export(export_dir: str, opts: WatchOptions, work: Path, tag: str) -> dict:
    """Sample from one GPT export (or reconstruct with a VQ export) and score it; returns the record body."""
    from argen.eval.sample import Sampler
    from argen.eval.score import clip_metrics, score
    from argen.model.io import read_record
    if read_record(export_dir).get("kind") == "vq":
        return evaluate_tokenizer(export_dir, opts, work, tag)
    if not opts.vq:
        raise ArgenError("the watcher needs --vq DIR to decode a GPT run's samples")
    out = work / f"{tag}.npz"
    sampler = Sampler(export_dir, opts.vq, precision=opts.protocol.precision)
    sample_record = sampler.run(opts.protocol, out, captions=opts.captions)
    del sampler
    gc.collect()
    body: dict = {"metrics": {}, "protocol": sample_record["protocol"], "sampling_s": sample_record["sampling_s"]}
    try:
        if opts.ref:
            result = score(out, opts.ref, inception=opts.inception, batch_size=opts.score_batch_size)
            body["metrics"].update(result["metrics"])
            body.update(reference=result["reference"], evaluator=result["evaluator"])
        if opts.clip:
            from argen.eval.clip_score import read_prompts
            if not opts.captions:
                raise ArgenError("--clip needs the t2i --captions file (with a 'prompts' array)")
            clip = clip_metrics(out, opts.clip, read_prompts(opts.captions), batch_size=opts.score_batch_size,
                                cycle=True)
            body["metrics"].update(clip["metrics"])
            body["clip"] = clip["clip"]
    finally:
        if not opts.keep_samples:
            out.unlink(missing_ok=True)
            sidecar_path(out).unlink(missing_ok=True)
    return body


def _local_copy(store: Store, export: Export, work: Path) -> str:
    if store.local:
        return export.path
    dest = work / "exports" / export.tag
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in ("model.safetensors", "config.json"):  # weights first: config.json marks a complete copy
        store.fs.get_file(f"{export.path}/{name}", str(dest / name))
    return str(dest)


def _wandb_mode(requested: str) -> str:
    if requested in ("online", "offline", "off"):
        return requested
    if os.environ.get("WANDB_MODE") == "disabled":
        return "off"
    if os.environ.get("WANDB_MODE") in ("offline", "dryrun"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return "online" if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore") else "offline"


def log_wandb(opts: WatchOptions, store: Store, record: dict, log: Callable[[str], None]) -> None:
    """One wandb run per (run dir, evaluation name), resumed across cron invocations; never fails the watcher."""
    mode = _wandb_mode(opts.wandb)
    if mode == "off":
        return
    try:
        import wandb

        from argen.eval.records import ExistsError, owner_id
        id_path = store.path("eval", "wandb", f"{opts.name}.id")
        try:
            store.create_exclusive(id_path, owner_id().replace(":", "-").encode())
        except ExistsError:
            pass
        with store.fs.open(id_path, "rb") as f:
            run_id = f.read().decode().strip()
        wdir = store.path("eval") if store.local else str(Path(tempfile.gettempdir()) / "argen-wandb")
        os.makedirs(wdir, exist_ok=True)
        run = wandb.init(project=opts.wandb_project, id=run_id, resume="allow", mode=mode, dir=wdir,
                         name=f"{Path(store.root).name}-{opts.name}", job_type="eval",
                         config={"run_dir": opts.run_dir, "protocol": record.get("protocol")})
        run.define_metric("train_step")
        run.define_metric("eval/*", step_metric="train_step")
        run.log({"train_step": record["step"],
                 **{f"eval/{k}{'_' + record['variant'] if record['variant'] else ''}": v
                    for k, v in record["metrics"].items()}})
        run.finish()
    except Exception as e:  # logging is a convenience; the record is already stored
        log(f"wandb logging failed ({type(e).__name__}: {e}); results.jsonl holds the record")


def _redraw(store: Store, records: list[dict], work: Path) -> None:
    from argen.eval.plots import plot_metrics
    png = plot_metrics(records, work / "metrics.png", title=f"evaluation of {Path(store.root).name}")
    if png:
        store.put_file(png, store.path("eval", "metrics.png"))


def watch_once(opts: WatchOptions, *, evaluate: Callable | None = None,
               log: Callable[[str], None] = print) -> list[dict]:
    """One pass over the run's exports; returns the records this watcher stored."""
    evaluate = evaluate or evaluate_export
    store = Store(opts.run_dir)
    records = Records(store, opts.name, opts.lock_ttl, opts.max_attempts)
    exports = list_exports(store)
    stored: list[dict] = []
    own_tmp = opts.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="argen-eval-")) if own_tmp else Path(opts.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    try:
        for export in exports:
            if records.has_result(export.tag):
                continue
            claim = records.try_claim(export.tag)
            if claim is None:
                state, _ = records.claim_state(export.tag)
                if state == "gave-up" and not records.has_result(export.tag):
                    log(f"{export.tag}: gave up after {opts.max_attempts} failed attempts (see eval/locks/)")
                continue
            start = time.time()
            try:
                log(f"{export.tag}: evaluating (claim {claim.gen})")
                local = _local_copy(store, export, work)
                try:
                    body = evaluate(local, opts, work, export.tag)
                finally:
                    if local != export.path:
                        shutil.rmtree(local, ignore_errors=True)
            except BaseException as e:
                # Released at once so another watcher need not wait out the TTL; counts as an attempt.
                claim.release("failed" if isinstance(e, Exception) else "interrupted",
                              error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
                if not isinstance(e, Exception):
                    raise
                log(f"{export.tag}: evaluation failed: {type(e).__name__}: {e}")
                continue
            record = {"name": opts.name, "tag": export.tag, "step": export.step, "variant": export.variant,
                      "export": store.url_of(export.path), **body, "elapsed_s": round(time.time() - start, 2),
                      "watcher": records.owner, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            kept = records.write_result(export.tag, record)
            claim.release("done")
            if not kept:
                log(f"{export.tag}: another watcher stored a result first; ours is discarded")
                continue
            stored.append(record)
            log(f"{export.tag}: " + ", ".join(f"{k}={v:.4g}" for k, v in record["metrics"].items()))
            log_wandb(opts, store, record, log)
        all_records = records.rebuild_jsonl()
        if all_records and (stored or not store.exists(store.path("eval", "metrics.png"))):
            _redraw(store, all_records, work)
    finally:
        if own_tmp:
            shutil.rmtree(work, ignore_errors=True)
    return stored


def status(opts: WatchOptions) -> list[dict]:
    """Where each export of the run stands for this evaluation name: done (with its metrics), running, failed,
    gave-up or pending."""
    store = Store(opts.run_dir)
    records = Records(store, opts.name, opts.lock_ttl, opts.max_attempts)
    rows = []
    for export in list_exports(store):
        row = {"tag": export.tag, "step": export.step}
        rec = store.read_json(records.result_path(export.tag))
        if rec:
            row.update(state="done", metrics=rec.get("metrics", {}))
        else:
            locks = records._locks(export.tag)
            state, _ = records.claim_state(export.tag)
            last = store.read_json(locks[-1][1]) if locks else None
            if state == "held":
                row.update(state="running", owner=(last or {}).get("owner"))
            elif state == "gave-up":
                row.update(state="gave-up", error=(last or {}).get("error"))
            elif locks:
                row.update(state="failed", attempts=len(locks), error=(last or {}).get("error"))
            else:
                row.update(state="pending")
        rows.append(row)
    return rows


def print_status(opts: WatchOptions) -> None:
    rows = status(opts)
    if not rows:
        print(f"no complete exports under {opts.run_dir}/exports")
    for r in rows:
        detail = ""
        if r["state"] == "done":
            detail = ", ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items())
        elif r.get("error"):
            detail = r["error"]
        elif r.get("owner"):
            detail = f"by {r['owner']}"
        print(f"{r['tag']:<24} {r['state']:<8} {detail}")


def watch(opts: WatchOptions, *, once: bool = False, interval: float = 300.0) -> int:
    if not Store(opts.run_dir).exists(Store(opts.run_dir).root):
        raise ArgenError(f"run directory not found: {opts.run_dir}")
    if threading.current_thread() is threading.main_thread():
        # Slurm/cron stop jobs with SIGTERM: unwind so the claim in hand is released instead of going stale.
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    while True:
        if once:
            stored = watch_once(opts)
            print(f"evaluated {len(stored)} export(s)")
            return 0
        try:
            watch_once(opts)
        except ArgenError:
            raise
        except Exception as e:  # a storage hiccup must not end a long-running watcher; the next pass retries
            print(f"watch pass failed: {type(e).__name__}: {e}; retrying in {interval:.0f}s")
        time.sleep(interval)
