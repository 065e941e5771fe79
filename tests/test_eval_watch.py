"""`argen eval watch`: each export evaluated exactly once, also with watchers racing; stale and failed claims;
results.jsonl, the plot, and the whole path on tiny models."""
import json
import threading
import time

import numpy as np
import pytest
import torch

import argen.model
from argen.cli import main as argen_main
from argen.eval.records import Records, Store
from argen.eval.sample import SampleProtocol
from argen.eval.watch import WatchOptions, watch_once
from tests.test_eval_sample import save_tiny_models
from tests.test_eval_score import save_tiny_inception


def fake_export(run, step, variant=""):
    """An export directory as training writes it (weights first, config.json last)."""
    d = run / "exports" / (f"step-{step:08d}" + (f"-{variant}" if variant else ""))
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "config.json").write_text(json.dumps({"kind": "gpt", "config": {}, "meta": {"step": step}}))
    return d


class CountingEval:
    """Stands in for sampling+scoring: records each call, optionally slow or failing."""

    def __init__(self, delay=0.0, fail=()):
        self.calls, self.delay, self.fail = [], delay, set(fail)
        self.lock = threading.Lock()

    def __call__(self, export_dir, opts, work, tag):
        with self.lock:
            self.calls.append(tag)
        time.sleep(self.delay)
        if tag in self.fail:
            raise RuntimeError(f"boom on {tag}")
        step = int(tag.split("-")[1])
        return {"metrics": {"fid": 100.0 / (1 + step), "inception_score": float(step)}}


def _opts(run, **kw):
    return WatchOptions(run_dir=str(run), wandb="off", **kw)


def _jsonl(run):
    return [json.loads(line) for line in (run / "eval" / "results.jsonl").read_text().splitlines()]


def test_evaluates_new_exports_once_and_skips_evaluated(tmp_path):
    run = tmp_path / "run"
    fake_export(run, 100)
    fake_export(run, 200)
    fake_export(run, 200, "ema")
    partial = run / "exports" / "step-00000300"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")  # no config.json yet: not complete
    ev = CountingEval()
    stored = watch_once(_opts(run), evaluate=ev, log=lambda m: None)
    assert sorted(ev.calls) == ["step-00000100", "step-00000200", "step-00000200-ema"]
    assert [r["tag"] for r in stored] == ["step-00000100", "step-00000200", "step-00000200-ema"]
    assert watch_once(_opts(run), evaluate=ev, log=lambda m: None) == [] and len(ev.calls) == 3
    (partial / "config.json").write_text(json.dumps({"kind": "gpt", "config": {}, "meta": {}}))
    watch_once(_opts(run), evaluate=ev, log=lambda m: None)
    assert ev.calls[-1] == "step-00000300" and len(ev.calls) == 4
    lines = _jsonl(run)
    assert [(r["step"], r["variant"]) for r in lines] == [(100, ""), (200, ""), (200, "ema"), (300, "")]
    assert all(r["name"] == "default" and "fid" in r["metrics"] for r in lines)
    png = run / "eval" / "metrics.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # another evaluation name keeps its own records but shares results.jsonl
    watch_once(_opts(run, name="cfg4"), evaluate=ev, log=lambda m: None)
    assert len(ev.calls) == 8 and len(_jsonl(run)) == 8


@pytest.mark.timeout(120)
def test_racing_watchers_never_duplicate_or_lose(tmp_path):
    run = tmp_path / "run"
    steps = [10, 20, 30, 40, 50, 60]
    for s in steps:
        fake_export(run, s)
    ev = CountingEval(delay=0.2)
    start = threading.Barrier(3)
    results = []

    def watcher():
        start.wait()
        results.append(watch_once(_opts(run), evaluate=ev, log=lambda m: None))

    threads = [threading.Thread(target=watcher) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(ev.calls) == [f"step-{s:08d}" for s in steps]  # each exactly once
    assert sorted(r["tag"] for rs in results for r in rs) == sorted(ev.calls)
    assert sum(1 for rs in results if rs) >= 2, "the watchers did not actually share the work"
    assert [r["step"] for r in _jsonl(run)] == steps


@pytest.mark.timeout(120)
def test_racing_watcher_processes(tmp_path):
    """Two OS processes claim through the filesystem: no export is evaluated twice."""
    import multiprocessing as mp
    run = tmp_path / "run"
    for s in range(1, 7):
        fake_export(run, s)
    ctx = mp.get_context("fork")
    log_dir = tmp_path / "calls"
    log_dir.mkdir()
    procs = [ctx.Process(target=_proc_watcher, args=(str(run), str(log_dir), i)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
        assert p.exitcode == 0
    calls = sorted(line for f in log_dir.iterdir() for line in f.read_text().split())
    assert calls == [f"step-{s:08d}" for s in range(1, 7)]
    assert len(_jsonl(run)) == 6


def _proc_watcher(run, log_dir, i):
    import pathlib

    def evaluate(export_dir, opts, work, tag):
        with open(pathlib.Path(log_dir) / f"w{i}.txt", "a") as f:
            f.write(tag + "\n")
        time.sleep(0.05)
        return {"metrics": {"fid": 1.0}}

    watch_once(WatchOptions(run_dir=run, wandb="off"), evaluate=evaluate, log=lambda m: None)


def test_stale_claim_is_taken_over_and_fresh_one_respected(tmp_path):
    run = tmp_path / "run"
    fake_export(run, 1)
    fake_export(run, 2)
    locks = run / "eval" / "locks" / "default"
    locks.mkdir(parents=True)
    old = time.time() - 3600
    (locks / "step-00000001.lock.0").write_text(json.dumps({"owner": "dead", "state": "running", "heartbeat": old}))
    (locks / "step-00000002.lock.0").write_text(json.dumps({"owner": "alive", "state": "running",
                                                             "heartbeat": time.time()}))
    ev = CountingEval()
    watch_once(_opts(run, lock_ttl=60), evaluate=ev, log=lambda m: None)
    assert ev.calls == ["step-00000001"]
    assert json.loads((locks / "step-00000001.lock.1").read_text())["state"] == "done"
    assert not (locks / "step-00000002.lock.1").exists()


def test_failed_evaluation_is_retried_then_given_up(tmp_path):
    run = tmp_path / "run"
    fake_export(run, 5)
    messages = []
    ev = CountingEval(fail={"step-00000005"})
    for _ in range(4):
        watch_once(_opts(run, max_attempts=2), evaluate=ev, log=messages.append)
    assert ev.calls == ["step-00000005"] * 2
    assert any("gave up" in m for m in messages) and any("boom" in m for m in messages)
    lock = json.loads((run / "eval" / "locks" / "default" / "step-00000005.lock.1").read_text())
    assert lock["state"] == "failed" and "boom" in lock["error"]
    assert not (run / "eval" / "results" / "default" / "step-00000005.json").exists()
    fake_export(run, 6)
    watch_once(_opts(run, max_attempts=2), evaluate=CountingEval(), log=messages.append)
    fake_export(run, 7)
    from argen.eval.watch import status
    states = {r["tag"]: r["state"] for r in status(_opts(run, max_attempts=2))}
    assert states == {"step-00000005": "gave-up", "step-00000006": "done", "step-00000007": "pending"}
    assert argen_main(["eval", "watch", str(run), "--status", "--max-attempts", "2"]) == 0


def test_heartbeat_keeps_a_long_claim_alive(tmp_path):
    run = tmp_path / "run"
    fake_export(run, 7)
    store = Store(str(run))
    holder = Records(store, lock_ttl=2.0)
    claim = holder.try_claim("step-00000007")
    assert claim is not None
    time.sleep(3.0)  # longer than the TTL: only the heartbeat keeps it fresh
    assert Records(store, lock_ttl=2.0).try_claim("step-00000007") is None
    claim.release("failed", error="test")
    assert Records(store, lock_ttl=2.0).try_claim("step-00000007") is not None


def test_rebuild_jsonl_converges_under_concurrent_writers(tmp_path):
    run = tmp_path / "run"
    store = Store(str(run))
    writers = [Records(store, name=f"n{i}") for i in range(4)]

    def body(rec, i):
        for s in range(5):
            rec.write_result(f"step-{s:08d}", {"name": rec.name, "step": s, "variant": "", "metrics": {}})
            rec.rebuild_jsonl()

    threads = [threading.Thread(target=body, args=(w, i)) for i, w in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(_jsonl(run)) == 20


@pytest.mark.timeout(180)
def test_watch_whole_path_tiny_models(tmp_path, monkeypatch, capsys):
    """CLI, real sampling from tiny exports, real scoring with a tiny Inception, then a skipped second pass."""
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    models = tmp_path / "models"
    gpt, vq = save_tiny_models(models)
    run = tmp_path / "run"
    for step in (100, 200):
        argen.model.save(argen.model.load(gpt), run / "exports" / f"step-{step:08d}", {"step": step})
    inc = save_tiny_inception(tmp_path / "inc.safetensors")
    from argen.eval.npz import save_images
    save_images(tmp_path / "ref.npz", np.random.default_rng(0).integers(0, 256, (12, 12, 12, 3), dtype=np.uint8))
    args = ["eval", "watch", str(run), "--vq", str(vq), "--ref", str(tmp_path / "ref.npz"), "--inception", str(inc),
            "--once", "--num", "8", "--batch-size", "4", "--image-size-eval", "12", "--precision", "fp32",
            "--wandb", "off"]
    assert argen_main(args) == 0
    lines = _jsonl(run)
    assert [r["step"] for r in lines] == [100, 200]
    rec = lines[0]
    assert {"fid", "sfid", "inception_score", "precision", "recall"} <= set(rec["metrics"])
    assert rec["protocol"]["num"] == 8 and rec["protocol"]["protocol"] == "balanced"
    assert rec["evaluator"]["weights_sha256"] and rec["reference"]["name"] == "ref.npz"
    assert "evaluated 2 export(s)" in capsys.readouterr().out
    assert argen_main(args) == 0 and "evaluated 0 export(s)" in capsys.readouterr().out
    assert len(_jsonl(run)) == 2 and (run / "eval" / "metrics.png").is_file()


def test_wandb_offline_logging(tmp_path, monkeypatch):
    import wandb  # noqa: F401 - a hard dependency: fail, not skip, if it is missing
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    fake_export(run, 3)
    messages = []
    watch_once(WatchOptions(run_dir=str(run), wandb="auto"), evaluate=CountingEval(), log=messages.append)
    assert not any("wandb logging failed" in m for m in messages), messages
    assert (run / "eval" / "wandb").is_dir() and list((run / "eval" / "wandb").glob("offline-run-*"))


@pytest.mark.s3
@pytest.mark.timeout(180)
def test_racing_watchers_on_s3(s3_bucket, tmp_path):
    """The same guarantees on object storage (create-exclusive puts with If-None-Match)."""
    import fsspec
    run = f"{s3_bucket}/runs/r1"
    fs, root = fsspec.core.url_to_fs(run)
    for s in (1, 2, 3, 4):
        local = fake_export(tmp_path / "local", s)
        for name in ("model.safetensors", "config.json"):
            fs.put_file(str(local / name), f"{root}/exports/{local.name}/{name}")
    ev = CountingEval(delay=0.2)
    seen_dirs = []

    def evaluate(export_dir, opts, work, tag):
        seen_dirs.append(export_dir)
        return ev(export_dir, opts, work, tag)

    start = threading.Barrier(2)

    def watcher():
        start.wait()
        watch_once(_opts(run), evaluate=evaluate, log=lambda m: None)

    threads = [threading.Thread(target=watcher) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(ev.calls) == [f"step-{s:08d}" for s in (1, 2, 3, 4)]
    # the exports were copied to local scratch (config.json last) for the sampler
    assert all(not d.startswith("s3://") and d.endswith(("00001", "00002", "00003", "00004")) for d in seen_dirs)
    fs.invalidate_cache()
    lines = [json.loads(x) for x in fs.cat_file(f"{root}/eval/results.jsonl").decode().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4] and lines[0]["export"].startswith("s3://")
    assert fs.exists(f"{root}/eval/metrics.png")
    assert watch_once(_opts(run), evaluate=ev, log=lambda m: None) == [] and len(ev.calls) == 4


def test_watch_tokenizer_run_reconstructs_reference(tmp_path, monkeypatch):
    """A VQ run's exports are scored by reconstructing --ref: paired rFID, PSNR and SSIM."""
    from argen.eval.npz import save_images
    from argen.model.vq import VQ_SIZES, VQModel
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    run = tmp_path / "vqrun"
    argen.model.save(VQModel(VQ_SIZES["VQ-micro"]), run / "exports" / "step-00000050", {"step": 50})
    save_images(tmp_path / "orig.npz", np.random.default_rng(1).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    inc = save_tiny_inception(tmp_path / "inc.safetensors")
    stored = watch_once(_opts(run, ref=str(tmp_path / "orig.npz"), inception=str(inc),
                              protocol=SampleProtocol(batch_size=4)), log=lambda m: None)
    assert len(stored) == 1
    m = stored[0]["metrics"]
    assert {"rfid", "psnr", "ssim"} <= set(m) and "fid" not in m
    assert stored[0]["protocol"] == {"kind": "reconstruction"} and 0 < m["psnr"] < 100


@pytest.mark.timeout(120)
def test_sigterm_releases_the_claim(tmp_path):
    """A watcher stopped by SIGTERM (Slurm time limit, cron kill) releases its claim instead of leaving it stale."""
    import os
    import signal
    import subprocess
    import sys
    run = tmp_path / "run"
    fake_export(run, 9)
    started = tmp_path / "started"
    script = (
        "import pathlib, time, argen.eval.watch as w\n"
        f"w.evaluate_export = lambda *a, **k: pathlib.Path({str(started)!r}).touch() or time.sleep(60)\n"
        f"w.watch(w.WatchOptions(run_dir={str(run)!r}, wandb='off'), once=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": os.getcwd()})
    lock = run / "eval" / "locks" / "default" / "step-00000009.lock.0"
    deadline = time.time() + 90
    while not started.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert lock.exists() and started.exists(), "the watcher never started evaluating the export"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 128 + signal.SIGTERM
    info = json.loads(lock.read_text())
    assert info["state"] == "interrupted" and "SystemExit" in info["error"]
    ev = CountingEval()
    watch_once(_opts(run), evaluate=ev, log=lambda m: None)  # taken over at once, no TTL wait
    assert ev.calls == ["step-00000009"]
