"""Slurm cluster fixture (pytest plugin, listed in tests/conftest.py).

`slurm` gives a test the local cluster that `ci/infra/slurm-up.sh` starts (2 emulated nodes on 127.0.0.1). It is
usable when `sbatch` exists and `scontrol ping` says the controller is UP and at least one node responds.
Otherwise the test FAILS when CI=true or REQUIRE_SLURM=1 (CI must never pass by skipping) and is skipped elsewhere,
with the reason printed.

Isolation: every job a test submits through the fixture gets a unique job name; teardown cancels whatever is
left under those names. Slurm tests share 2 real cores: keep job payloads tiny and the tests serial.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest


def _required() -> bool:
    return os.environ.get("REQUIRE_SLURM") == "1" or os.environ.get("CI", "").lower() == "true"


def _probe() -> str | None:
    """None when the cluster is usable, else why not."""
    if shutil.which("sbatch") is None or shutil.which("scontrol") is None:
        return "no Slurm client (sbatch/scontrol) on PATH; start the cluster with: bash ci/infra/slurm-up.sh"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "'scontrol ping' timed out"
    if "is UP" not in ping.stdout:
        return f"slurmctld is not up ({(ping.stdout or ping.stderr).strip()}); run: bash ci/infra/slurm-up.sh"
    nodes = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=10)
    up = [line for line in nodes.stdout.splitlines()
          if re.search(r"\s(idle|mixed|allocated|completing)\*?$", line) and not line.rstrip().endswith("*")]
    if not up:
        return f"no Slurm node is up: {nodes.stdout.strip() or nodes.stderr.strip()}"
    return None


class SlurmCluster:
    """Small helpers over the real CLI for tests."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.names: list[str] = []
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %c"], capture_output=True, text=True, check=True)
        self.nodes = {line.split()[0]: int(line.split()[1]) for line in out.stdout.splitlines() if line.strip()}

    def name(self, prefix: str = "t") -> str:
        n = f"argen-test-{prefix}-{uuid.uuid4().hex[:8]}"
        self.names.append(n)
        return n

    def sbatch(self, script: str | Path, *args: str) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args, str(script)], capture_output=True, text=True)
        assert out.returncode == 0, f"sbatch failed: {out.stderr.strip()}"
        return out.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True)
        if out.returncode != 0 or not out.stdout.strip():
            return {}
        rec = {}
        for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(\S*)", out.stdout.splitlines()[0]):
            rec.setdefault(m.group(1), m.group(2))
        return rec

    def state(self, job: str) -> str:
        return self.job(job).get("JobState", "")

    def wait_until(self, pred, timeout: float, what: str, poll: float = 0.5):
        end = time.monotonic() + timeout
        while True:
            v = pred()
            if v:
                return v
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
            time.sleep(poll)

    def wait_state(self, job: str, states: str | tuple[str, ...], timeout: float = 60) -> str:
        states = (states,) if isinstance(states, str) else states
        return self.wait_until(lambda: (s := self.state(job)) in states and s, timeout,
                               f"job {job} to reach {'/'.join(states)} (now {self.state(job)})")

    def wait_done(self, job: str, timeout: float = 120) -> str:
        from argen.launcher import slurm
        return slurm.wait([job], timeout=timeout, poll=0.5)[job]

    def cancel_all(self) -> None:
        for n in self.names:
            subprocess.run(["scancel", "--name", n], capture_output=True)


@pytest.fixture(scope="session")
def _slurm_available() -> str | None:
    return _probe()


@pytest.fixture
def slurm(_slurm_available, tmp_path):
    if _slurm_available is not None:
        if _required():
            pytest.fail(f"Slurm is required here (CI/REQUIRE_SLURM) but unusable: {_slurm_available}")
        pytest.skip(f"Slurm not available: {_slurm_available}")
    tmp_path.chmod(0o755)
    cluster = SlurmCluster(tmp_path)
    yield cluster
    cluster.cancel_all()
