"""Kill -9 the real `argen tokenize` process mid-run, twice, then rerun: the data set equals an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argen.data_pipeline import shard_format as sf
from tests.test_tokenize import SIZE, dataset, make_cfg, run

# identical batching in both runs: conv rounding depends on the batch size, and the shards must be bit-identical
COMMON = ["source.num_images=120", "output.samples_per_shard=10", "augment.crop_ranges=[1.1]", "images_per_batch=2"]


def _cli(vq: str, out: Path, cfg_file: Path) -> list[str]:
    return [sys.executable, "-m", "argen.cli", "tokenize", "--no-progress", str(cfg_file),
            f"vq.path={vq}", f"output.url={out}", f"image_size={SIZE}", "threads=1", "num_workers=0",
            *COMMON]


def _records(out: Path) -> int:
    work = out / "_work"
    return len([n for n in os.listdir(work) if n.startswith("shard-")]) if work.is_dir() else 0


def _kill_after(cmd: list[str], out: Path, records: int) -> None:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while _records(out) < records:
            assert p.poll() is None, f"job ended before it could be killed: {p.stderr.read().decode()[-2000:]}"
            assert time.time() < deadline, "no progress within 120 s"
            time.sleep(0.02)
        # kill at once: the next shard is already being written, and on an idle machine a pause here let the
        # whole (small) job finish before the kill
        os.kill(p.pid, signal.SIGKILL)
        p.wait(30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    # whatever is visible is whole: every shard file reads to the end
    for name in os.listdir(out):
        if name.startswith("shard-"):
            list(sf.read_shard(str(out / name)))
    assert not (out / "manifest.json").exists()


@pytest.mark.timeout(300)
def test_kill_and_resume_equals_uninterrupted(tmp_path, vq_dir):
    cfg_file = tmp_path / "tok.yaml"
    cfg_file.write_text("source:\n  kind: synthetic\n")
    out = tmp_path / "killed"
    cmd = _cli(vq_dir, out, cfg_file)
    _kill_after(cmd, out, 1)
    _kill_after(cmd, out, 4)
    done_before = _records(out)
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resuming part 0/1: {done_before} of 12 shards already complete" in final.stderr
    assert "120 samples in 12 shards" in final.stdout

    ref_job, _ = run(make_cfg(vq_dir, str(tmp_path / "clean"), *COMMON))
    ref = ref_job.finalize()
    got, samples = dataset(str(out))
    assert [(s.name, s.sha256) for s in got.shards] == [(s.name, s.sha256) for s in ref.shards]
    assert sorted(int(k) for k in samples) == list(range(120))         # none missing, none duplicated
    assert sorted(os.listdir(out)) == ["manifest.json"] + [s.name for s in ref.shards]  # no temp files, no _work


@pytest.mark.timeout(240)
def test_torchrun_ranks_split_and_rank0_finalizes(tmp_path, vq_dir):
    cfg_file = tmp_path / "tok.yaml"
    cfg_file.write_text("source:\n  kind: synthetic\n  num_images: 20\naugment:\n  mode: center\n")
    out = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "argen.cli", "tokenize", "--no-progress", str(cfg_file), f"vq.path={vq_dir}",
           f"output.url={out}", f"image_size={SIZE}", "threads=1", "num_workers=0", "output.samples_per_shard=5"]
    procs = [subprocess.Popen(cmd, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (1, 0)]
    outs = [p.communicate(timeout=200) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert "part 1/2 done" in outs[0][0] and "20 samples in 4 shards" in outs[1][0]
    m, samples = dataset(str(out))
    assert sorted(int(k) for k in samples) == list(range(20))
