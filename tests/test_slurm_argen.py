"""The real argen programs under Slurm, submitted with `argen submit` exactly as a user would:
an array tokenization + finalize equals a single-process run; a 2-node x 2-rank `argen train` job is preempted
with USR1, checkpoints, requeues itself and resumes to the same losses as an uninterrupted single-process run;
the scaling tool builds its table and plot from real 1- and 2-node jobs.

Sizes are tiny (the whole machine has 2 cores): VQ-micro at 16 px, GPT-tiny at 64 px (4x4 tokens), batch 4.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from argen.launcher import slurm as sl
from argen.launcher import submit_cli
from tests.dist_utils import free_port

pytestmark = [pytest.mark.slurm]

REPO = Path(__file__).resolve().parents[1]
TINY = ["train.global_batch=4", "model.image_size=64", "log.every=1", "log.wandb=off", "train.checkpoint_every=0",
        "optim.warmup_steps=2"]


def _job_id(out: str, after: str) -> str:
    return out.split(after, 1)[1].split()[0].rstrip(":,")


def _text(p: Path) -> str:
    return p.read_text() if p.exists() else f"<no {p}>"


def _logs(d: Path) -> str:
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted(d.glob("*.out"))) if d.is_dir() else ""


@pytest.mark.timeout(200)
def test_array_tokenize_plus_finalize_equals_single_job(slurm, tmp_path, capsys, monkeypatch):
    import argen.model as M
    from argen.data_pipeline import shard_format as sf
    from argen.model.vq import VQ_SIZES, VQModel

    monkeypatch.chdir(tmp_path)
    vq = tmp_path / "vq-micro"
    torch.manual_seed(0)
    M.save(VQModel(VQ_SIZES["VQ-micro"]), vq)
    cfg = tmp_path / "tok.yaml"
    cfg.write_text("source:\n  kind: synthetic\n  num_images: 24\naugment:\n  mode: center_flip\n"
                   f"vq:\n  path: {vq}\noutput:\n  samples_per_shard: 6\nimage_size: 16\nthreads: 1\n"
                   "num_workers: 0\nimages_per_batch: 4\n")
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "argen.cli", "tokenize", "--no-progress", str(cfg),
                    f"output.url={single}"], check=True, capture_output=True, timeout=120)
    arr = tmp_path / "array"
    logs = tmp_path / "logs"
    name = slurm.name("tok")
    assert submit_cli.main(["tokenize", str(cfg), "--array", "2", "--time", "5", "--job-name", name,
                            "--log-dir", str(logs), f"output.url={arr}"]) == 0
    out = capsys.readouterr().out
    array_job, final_job = _job_id(out, "array job "), _job_id(out, "finalize job ")
    assert f"afterok:{array_job}" in out
    assert slurm.job(final_job).get("Dependency", "").startswith(f"afterok:{array_job}")
    assert slurm.wait_done(final_job, 170) == "COMPLETED", _logs(logs)
    assert sl.wait([array_job], 10)[array_job] == "COMPLETED"
    # two array tasks, each wrote its own part; finalize wrote the manifest
    part_logs = sorted(logs.glob(f"{name}-{array_job}_*.out"))
    assert len(part_logs) == 2 and all("part" in p.read_text() for p in part_logs), _logs(logs)
    m1, m2 = sf.read_manifest(str(single)), sf.read_manifest(str(arr))
    assert m2.num_samples == m1.num_samples == 24
    assert [(s.name, s.sha256, s.num_samples) for s in m2.shards] == \
           [(s.name, s.sha256, s.num_samples) for s in m1.shards]


def _losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        if "loss" in r and "step" in r:
            out[int(r["step"])] = float(r["loss"])
    return out


def _local_run(world: int, args: list[str], timeout: float) -> None:
    """The same `argen train` as `world` local processes (torchrun-style variables), without Slurm."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-m", "argen.cli", "train", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    outs = [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)


@pytest.mark.timeout(420)
def test_train_2x2_preempted_requeued_resumes_exactly(slurm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    steps = 16
    over = [*TINY, f"train.max_steps={steps}"]
    cfg = str(REPO / "configs/gpt-tiny.yaml")
    run = tmp_path / "run"
    name = slurm.name("gpt")
    assert submit_cli.main(["train", cfg, "--nodes", "2", "--tasks-per-node", "2", "--time", "10",
                            "--job-name", name, f"run_dir={run}", *over]) == 0
    job = _job_id(capsys.readouterr().out, "submitted training job ")
    log = run / "slurm" / f"{name}-{job}.out"
    metrics = run / "metrics.jsonl"
    slurm.wait_until(lambda: metrics.exists() and len(_losses(metrics)) >= 1, 240,
                     f"a logged step of job {job}\n{_text(log)}", poll=0.05)
    sl.scancel(job, signal="USR1", batch=True)   # what --signal=B:USR1@N delivers before the time limit
    # while Slurm holds the requeued job (~cred_expire): the same run uninterrupted, 4 local ranks, no Slurm
    ref = tmp_path / "ref"
    _local_run(4, [cfg, f"run_dir={ref}", *over], timeout=300)
    slurm.wait_until(lambda: slurm.job(job).get("Restarts") == "1", 120, f"job {job} to requeue\n{_text(log)}")
    assert slurm.wait_done(job, 240) == "COMPLETED", _text(log)

    text = _text(log)
    assert "rendezvous n1:" in text and "2 node(s) x 2 task(s)" in text and "dp=4" in text
    assert "USR1 (preemption or time limit)" in text and f"requeueing job {job}" in text
    assert "checkpoint saved at step" in text, text
    k = int(text.split("checkpoint saved at step ")[1].split()[0].rstrip(",:"))
    assert 1 <= k < steps and f"at step {k}" in text.split("restart 1")[1], text   # resumed where it stopped
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert f"step-{steps:08d}" in ckpts and (run / "exports" / f"step-{steps:08d}").is_dir()
    got, want = _losses(metrics), _losses(ref / "metrics.jsonl")
    assert sorted(got) == sorted(want) == list(range(1, steps + 1))
    assert all(abs(got[s] - want[s]) <= 1e-6 * max(1.0, abs(want[s])) for s in want), (k, got, want)


@pytest.mark.timeout(300)
def test_scaling_table_and_plot_from_real_jobs(slurm, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "scaling"
    assert submit_cli.main(["scaling", str(REPO / "configs/gpt-tiny.yaml"), "--nodes", "1,2", "--tasks-per-node", "1",
                            "--time", "10", "--out", str(out), "--poll", "1", "--wait-timeout", "280",
                            "--job-name", slurm.name("scale"), *TINY, "train.max_steps=4"]) == 0
    printed = capsys.readouterr().out
    jobs = json.loads((out / "jobs.json").read_text())
    assert [(j["nodes"], j["ranks"], j["state"]) for j in jobs] == [(1, 1, "COMPLETED"), (2, 2, "COMPLETED")]
    rows = list(__import__("csv").DictReader((out / "scaling.csv").open()))
    assert [r["nodes"] for r in rows] == ["1", "2"]
    for r, j in zip(rows, jobs):
        recs = [json.loads(x) for x in (Path(j["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        tps = sorted(x["tokens_per_s"] for x in recs[1:])
        assert float(r["tokens_per_s"]) == pytest.approx(tps[len(tps) // 2] if len(tps) % 2 else
                                                         (tps[len(tps) // 2 - 1] + tps[len(tps) // 2]) / 2)
        assert float(r["tokens_per_s"]) > 0 and r["efficiency"]
    assert float(rows[0]["efficiency"]) == 1.0
    assert "| 2 | 2 |" in (out / "scaling.md").read_text() and "| 2 | 2 |" in printed
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
