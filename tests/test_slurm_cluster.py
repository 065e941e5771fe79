"""Jobs on the real local Slurm cluster (ci/infra/slurm-up.sh: 2 emulated nodes x 2 CPUs).

The batch scripts are the ones `argen submit` renders from slurm/*.sbatch. Where the real `argen train` is not
needed to show the Slurm side (rendezvous, signal forwarding, requeue, scaling collection), a small trainer
stand-in that uses argen's dist_env and preemption modules runs instead; tests/test_slurm_argen.py runs the real
trainer and tokenizer under the same templates.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argen.launcher import slurm as sl
from argen.launcher import submit_cli

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(150)]

# A trainer in miniature: same launch detection, same preemption flag, exact resume from its checkpoint.
STANDIN = r'''
import json, os, socket, sys, time
from pathlib import Path
import torch
import torch.distributed as dist
from argen.launcher import dist_env, preemption

args = dict(a.split("=", 1) for a in sys.argv[1:])
out = Path(args["run_dir"]); steps = int(args.get("train.max_steps", 20))
step_time = float(args.get("step_time", 0.2)); resume = args.get("train.resume", "never")
env, device = dist_env.init()
preemption.install()
if env.rank == 0:
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    with open(out / "ranks.jsonl", "a") as f:
        f.write(json.dumps({"restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\n")
t = torch.tensor([float(env.rank + 1)])
if env.world_size > 1:
    dist.all_reduce(t)
with open(out / f"rank{env.rank}.json", "w") as f:
    json.dump({"rank": env.rank, "world": env.world_size, "local": env.local_rank, "host": socket.gethostname(),
               "master": env.master_addr, "port": env.master_port, "launcher": env.launcher,
               "sum": t.item()}, f)
torch.manual_seed(0)
model = torch.nn.Linear(8, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
ck = out / "checkpoints" / "last.pt"
step = 0
if resume == "auto" and ck.exists():
    state = torch.load(ck)
    model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"]); step = state["step"]
    print(f"resumed from step {step}", flush=True)
t0 = time.time()
while step < steps:
    g = torch.Generator().manual_seed(1000 + step * env.world_size + env.rank)
    x = torch.randn(16, 8, generator=g); y = x.sum(1, keepdim=True)
    loss = torch.nn.functional.mse_loss(model(x), y)
    opt.zero_grad(); loss.backward()
    if env.world_size > 1:
        for p in model.parameters():
            dist.all_reduce(p.grad); p.grad /= env.world_size
        dist.all_reduce(loss := loss.detach().clone()); loss /= env.world_size
    opt.step(); step += 1
    time.sleep(step_time)
    if env.rank == 0:
        dt = time.time() - t0; t0 = time.time()
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": loss.item(), "tokens_per_s": 16 * env.world_size / dt,
                                "mfu": 0.01 * env.world_size, "world_size": env.world_size}) + "\n")
    if preemption.stop_requested():
        if env.rank == 0:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step}, ck)
        print(f"rank {env.rank}: {preemption.reason()} -> saved checkpoint at step {step}", flush=True)
        sys.exit(0)
print(f"rank {env.rank}: finished {steps} steps", flush=True)
'''


def _standin(tmp: Path) -> list[str]:
    p = tmp / "standin_train.py"
    p.write_text(STANDIN)
    return [str(p)]


def _submit_standin(slurm, run_dir: Path, *, nodes: int, tasks: int, overrides: list[str], requeue=True,
                    time_limit="5", signal_lead=60) -> tuple[str, Path]:
    name = slurm.name("train")
    r = sl.Resources(job_name=name, time=time_limit, chdir=str(Path.cwd()))
    text = submit_cli.render_train("unused.yaml", [f"run_dir={run_dir}", *overrides], nodes=nodes,
                                   gpus_per_node=0, tasks_per_node=tasks, cpus_per_task=None, resources=r,
                                   run_dir=run_dir, log_dir=run_dir / "slurm", python=sys.executable,
                                   signal_lead_s=signal_lead, requeue=requeue, entry=_standin(slurm.workdir))
    script = sl.write_script(text, run_dir / "slurm" / f"{name}.sbatch")
    job = sl.sbatch(script)
    return job, run_dir / "slurm" / f"{name}-{job}.out"


def _log(path: Path) -> str:
    return path.read_text() if path.exists() else "<no log>"


def _losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = r["loss"]  # a step logged twice (re-run after resume) keeps the newest value
    return out


def test_two_nodes_two_tasks_rendezvous(slurm):
    run = slurm.workdir / "rdv"
    job, log = _submit_standin(slurm, run, nodes=2, tasks=2, overrides=["train.max_steps=2", "step_time=0"])
    assert slurm.wait_done(job, 120) == "COMPLETED", _log(log)
    ranks = sorted((json.loads((run / f"rank{i}.json").read_text()) for i in range(4)), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    assert all(r["world"] == 4 and r["launcher"] == "srun" for r in ranks)
    assert all(r["sum"] == 10.0 for r in ranks), ranks           # gloo all_reduce over all 4 ranks
    assert {r["host"] for r in ranks} == {"n1", "n2"}              # really two (emulated) nodes
    assert [r["local"] for r in ranks] == [0, 1, 0, 1]
    first = ranks[0]["host"]
    assert all(r["master"] == first and r["port"] == 20000 + int(job) % 20000 for r in ranks)
    text = _log(log)
    assert f"rendezvous {first}:{20000 + int(job) % 20000}" in text and "tasks exited with status 0" in text


GPU_PAYLOAD = r"""
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:])
keys = ["SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_DEBUG", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS"]
with open(os.path.join(args["run_dir"], "task%s.json" % os.environ["SLURM_PROCID"]), "w") as f:
    json.dump({k: os.environ.get(k) for k in keys}, f)
"""


def test_gpu_layout_one_task_per_gpu(slurm):
    """The GPU path of the template on (fake) GPU nodes: --gpus-per-node 2 -> 2 tasks that each see both GPUs
    (the local rank picks one) and the NCCL environment. slurm-up.sh advertises 2 fake GPUs per node."""
    gres = subprocess.run(["sinfo", "-h", "-N", "-o", "%G"], capture_output=True, text=True).stdout
    assert "gpu:" in gres, f"the CI cluster advertises fake GPUs (SLURM_FAKE_GPUS); sinfo says {gres!r}"
    run = slurm.workdir / "gpu"
    run.mkdir()
    name = slurm.name("gpu")
    r = sl.Resources(job_name=name, time="5", chdir=str(Path.cwd()))
    text = submit_cli.render_train("unused.yaml", [f"run_dir={run}"], nodes=1, gpus_per_node=2, tasks_per_node=2,
                                   cpus_per_task=1, resources=r, run_dir=run, log_dir=run / "slurm",
                                   python=sys.executable, signal_lead_s=60, entry=["-c", GPU_PAYLOAD])
    job = sl.sbatch(sl.write_script(text, run / "slurm" / f"{name}.sbatch"))
    log = run / "slurm" / f"{name}-{job}.out"
    assert slurm.wait_done(job, 60) == "COMPLETED", _log(log)
    tasks = [json.loads((run / f"task{i}.json").read_text()) for i in range(2)]
    assert [t["SLURM_LOCALID"] for t in tasks] == ["0", "1"] and all(t["SLURM_NTASKS"] == "2" for t in tasks)
    assert all(t["CUDA_VISIBLE_DEVICES"] == "0,1" and t["SLURM_GPUS_ON_NODE"] == "2" for t in tasks), tasks
    assert all(t["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and t["NCCL_DEBUG"] == "WARN" for t in tasks)
    assert all(t["OMP_NUM_THREADS"] == "1" and t["MASTER_PORT"] == str(20000 + int(job) % 20000) for t in tasks)


def test_usr1_requeue_then_cancel_without_requeue_and_status(slurm, capsys):
    """The shell side of preemption with a stand-in trainer (the real trainer: test_slurm_argen.py): USR1 ->
    checkpoint -> requeue -> resume; then a plain scancel: TERM -> checkpoint -> CANCELLED, no requeue."""
    run = slurm.workdir / "cancel"
    job, log = _submit_standin(slurm, run, nodes=1, tasks=1,
                               overrides=["train.max_steps=400", "step_time=0.2", "train.resume=auto"])
    # USR1 as soon as the batch script runs: the tasks are still starting Python (no handler yet). They ignore
    # the signal until the handler exists, and the script sends it again until they have stopped.
    slurm.wait_until(lambda: "restart 0 on" in _log(log), 60, f"the job to start\n{_log(log)}", poll=0.05)
    assert not (run / "metrics.jsonl").exists()
    sl.scancel(job, signal="USR1", batch=True)
    slurm.wait_until(lambda: slurm.job(job).get("Restarts") == "1", 90, f"job {job} to requeue\n{_log(log)}")
    assert "sending USR1 again" in _log(log)
    slurm.wait_until(lambda: "resumed from step" in _log(log), 60, f"the resumed run\n{_log(log)}", poll=0.2)
    k = int(_log(log).split("resumed from step ")[1].split()[0])
    assert k >= 1 and f"SIGUSR1 -> saved checkpoint at step {k}" in _log(log)
    subprocess.run(["scancel", job], check=True)
    slurm.wait_state(job, "CANCELLED", 30)
    slurm.wait_until(lambda: _log(log).count("saved checkpoint") == 2, 15, f"checkpoint on cancel\n{_log(log)}")
    text = _log(log)
    assert "SIGTERM -> saved checkpoint" in text and text.count("requeueing") == 1
    assert torch_load_step(run / "checkpoints" / "last.pt") > k
    time.sleep(3)
    assert slurm.state(job) == "CANCELLED" and slurm.job(job).get("Restarts") == "1"
    # status: scontrol knows the job, and argen reads the last metrics from the run dir in the job's comment
    assert submit_cli.main(["status", job]) == 0
    out = capsys.readouterr().out
    assert f"job {job} (from scontrol)" in out and "CANCELLED" in out and "Restarts" in out
    assert "last metrics  step=" in out
    assert submit_cli.main(["status", job, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["records"][0]["JobState"] == "CANCELLED" and data["records"][0]["Restarts"] == "1"
    assert submit_cli.main(["status", "999999"]) == 1
    assert "unknown to Slurm" in capsys.readouterr().err
    # jobs that scontrol has forgotten are found in jobcomp (no accounting DB here), or in sacct where it exists
    recs = sl.jobcomp_records(job) or sl.sacct(job)
    assert recs and (recs[-1].get("JobState") or recs[-1].get("State")) == "CANCELLED"


def torch_load_step(path: Path) -> int:
    import torch
    return int(torch.load(path)["step"])


def test_eval_cron_resubmits_itself(slurm, tmp_path, capsys):
    run = tmp_path / "evalrun"
    run.mkdir()
    name = slurm.name("eval")
    # `-- --help`: the evaluator's own arguments pass through; --help makes it print its usage and exit 0
    assert submit_cli.main(["eval-cron", str(run), "--every", "3s", "--mode", "resubmit", "--time", "2",
                            "--job-name", name, "--", "--help"]) == 0
    first = capsys.readouterr().out.split("job ")[1].split()[0]
    log = run / "slurm" / f"{name}.out"
    # two runs of the chain, each queueing the next one
    slurm.wait_until(lambda: _log(log).count("next evaluation queued") >= 2, 60, f"two chain links\n{_log(log)}")
    text = _log(log)
    assert f"evaluating {run} (job {first})" in text and "usage: argen eval watch" in text
    # a second install is refused while the chain lives; --remove stops it
    with pytest.raises(Exception, match="already queued"):
        submit_cli.main(["eval-cron", str(run), "--every", "3s", "--mode", "resubmit", "--job-name", name])
    assert submit_cli.main(["eval-cron", str(run), "--mode", "resubmit", "--remove", "--job-name", name]) == 0
    slurm.wait_until(lambda: not submit_cli._existing_jobs(name), 20, "the chain to be cancelled")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_time_limit_signal_checkpoints_and_requeues(slurm):
    """The real time-limit path (nightly): --time=1 with --signal=B:USR1@30. Slurm's ~30 s limit loop delivers USR1
    some 10-40 s before the limit; each run checkpoints, requeues and resumes until the run is done."""
    run = slurm.workdir / "timelimit"
    steps = 100  # ~35 s of steps: more than one run's share before the signal, so at least one requeue
    job, log = _submit_standin(slurm, run, nodes=1, tasks=1, time_limit="1", signal_lead=30,
                               overrides=[f"train.max_steps={steps}", "step_time=0.35", "train.resume=auto"])
    assert slurm.wait_done(job, 580) == "COMPLETED", _log(log)
    text = _log(log)
    restarts = int(slurm.job(job).get("Restarts", "0"))
    assert restarts >= 1 and text.count("requeueing job") == restarts and "DUE TO TIME LIMIT" not in text, text
    saved = [int(x.rsplit(" ", 1)[1]) for x in text.splitlines() if "saved checkpoint at step" in x]
    resumed = [int(x.split("resumed from step ")[1].split()[0]) for x in text.splitlines() if "resumed from step" in x]
    # every run resumed where the previous one saved; a USR1 that lands after the last step (while Python exits)
    # still requeues, and that run resumes at the end and stops at once
    assert len(resumed) == restarts and all(r in saved or r == steps for r in resumed), text
    assert saved == sorted(saved) and resumed[:len(saved)] == saved, text
    ref = slurm.workdir / "timelimit-ref"
    subprocess.run([sys.executable, _standin(slurm.workdir)[0], f"run_dir={ref}", f"train.max_steps={steps}",
                    "step_time=0"], check=True, timeout=120)
    got, want = _losses(run), _losses(ref)
    assert sorted(got) == list(range(1, steps + 1)) and all(abs(got[s] - want[s]) < 1e-6 for s in want)
