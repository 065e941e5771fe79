"""`argen submit` rendering, argument checking and the scaling table: no cluster needed."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from argen.errors import ArgenError
from argen.launcher import scaling, slurm, submit_cli

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("run_dir: %s\ntrain:\n  lr: 1.0e-3\n" % (tmp_path / "run"))
    return p


def _dry(capsys, *argv) -> str:
    assert submit_cli.main(list(argv)) == 0
    return capsys.readouterr().out


def _sbatch_opts(text: str) -> dict:
    """#SBATCH lines -> {option: value} (flags map to True)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#SBATCH "):
            opt = line[len("#SBATCH "):].strip()
            k, _, v = opt.partition("=")
            out[k] = v if _ else True
    return out


def test_train_dry_run_gpu(capsys, cfg, tmp_path):
    text = _dry(capsys, "train", str(cfg), "--nodes", "4", "--gpus-per-node", "8", "--time", "2-00:00:00",
                "--partition", "gpu", "--account", "proj", "--qos", "high", "--constraint", "h100&ib",
                "--cpus-per-task", "12", "model.name=GPT-B", "--dry-run", "train.lr=2e-4")
    o = _sbatch_opts(text)
    assert o["--nodes"] == "4" and o["--ntasks-per-node"] == "8" and o["--gpus-per-node"] == "8"
    assert o["--cpus-per-task"] == "12" and o["--time"] == "2-00:00:00"
    assert (o["--partition"], o["--account"], o["--qos"], o["--constraint"]) == ("gpu", "proj", "high", "h100&ib")
    assert o["--requeue"] is True and o["--open-mode"] == "append" and o["--signal"] == "B:USR1@120"
    # per-job log path in the run dir, named after job name and id
    assert o["--output"] == f"{tmp_path / 'run'}/slurm/%x-%j.out"
    # the command: every override, in order, then resume=auto
    cmd = next(line for line in text.splitlines() if line.startswith("TRAIN_CMD="))
    assert f"-m argen.cli train {cfg}" in cmd and cmd.index("model.name=GPT-B") < cmd.index("train.lr=2e-4")
    assert "RESUME=(train.resume=auto)" in text
    assert 'export TORCH_NCCL_ASYNC_ERROR_HANDLING=1' in text and "GPUS_PER_NODE=8" in text
    # rendezvous and requeue plumbing
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in text and "MASTER_PORT=$(( 20000 + SLURM_JOB_ID" in text
    assert "trap on_usr1 USR1" in text and 'scontrol requeue "$SLURM_JOB_ID"' in text
    # the script is valid bash, and dry-run wrote nothing
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert not (tmp_path / "run").exists()


def test_train_cpu_layout_and_defaults(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text("train:\n  lr: 0.1\n")
    text = _dry(capsys, "train", str(cfg), "--nodes", "2", "--cpus-per-node", "2", "--time", "10", "--dry-run",
                "--signal-lead", "60", "train.resume=never", "--python", "/opt/py/bin/python")
    o = _sbatch_opts(text)
    assert o["--nodes"] == "2" and o["--ntasks-per-node"] == "2" and "--gpus-per-node" not in o
    assert o["--signal"] == "B:USR1@60" and o["--chdir"] == str(tmp_path)
    # no run_dir in the recipe: argen picks runs/<recipe> and passes it on
    assert f"run_dir={tmp_path / 'runs' / 'tiny'}" in text
    assert "RESUME=()" in text  # the user's own train.resume wins
    assert "TRAIN_CMD=(/opt/py/bin/python -m argen.cli train" in text and "GPUS_PER_NODE=0" in text
    assert "--partition" not in o and "--account" not in o


def test_quoting_survives_spaces(tmp_path):
    run = tmp_path / "my run"
    r = slurm.Resources(job_name="x", time="5")
    text = submit_cli.render_train(str(tmp_path / "a b.yaml"), ["data.name=two words"], nodes=1, gpus_per_node=0,
                                   tasks_per_node=1, cpus_per_task=None, resources=r, run_dir=run,
                                   log_dir=tmp_path / "logs", python=sys.executable)
    out = subprocess.run(["bash", "-c", text.split("log() {")[0] + 'printf "%s\\n" "$RUN_DIR" "${TRAIN_CMD[@]}"'],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == str(run) and "data.name=two words" in out and str(tmp_path / "a b.yaml") in out


@pytest.mark.parametrize("argv, msg", [
    (["--nodes", "2", "--time", "10"], "give --gpus-per-node"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2", "--time", "10"], "one task per GPU"),
    (["--gpus-per-node", "4", "--time", "1:2:3:4"], "--time"),
    (["--gpus-per-node", "4", "--time", "1"], "not longer than --signal-lead"),
    (["--gpus-per-node", "4", "--nodes", "0"], "--nodes must be >= 1"),
])
def test_train_bad_arguments(cfg, argv, msg):
    with pytest.raises(ArgenError, match=msg.replace("-", r"\-")):
        submit_cli.main(["train", str(cfg), *argv, "--dry-run"])


def test_missing_config_and_bad_override(tmp_path, cfg, capsys):
    with pytest.raises(ArgenError, match="config file not found"):
        submit_cli.main(["train", str(tmp_path / "nope.yaml"), "-G", "1", "--dry-run"])
    with pytest.raises(SystemExit):
        submit_cli.main(["train", str(cfg), "-G", "1", "--dry-run", "notanoverride"])
    assert "unrecognized arguments: notanoverride" in capsys.readouterr().err


def test_cli_dispatch_errors_are_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "argen.cli", "submit", "train", str(tmp_path / "x.yaml"), "-G", "1"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip() == f"argen submit: error: config file not found: {tmp_path / 'x.yaml'}"
    out = subprocess.run([sys.executable, "-m", "argen.cli", "submit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "eval-cron" in out.stdout and "scaling" in out.stdout and "status" in out.stdout


def test_template_with_unknown_placeholder_fails(tmp_path, monkeypatch):
    (tmp_path / "train.sbatch").write_text("#!/bin/bash\n{{sbatch}}\necho {{no_such_value}}\n")
    monkeypatch.setattr(slurm, "TEMPLATE_DIR", tmp_path)
    with pytest.raises(ArgenError, match=r"no value for placeholder\(s\) \{\{no_such_value\}\}"):
        slurm.render("train.sbatch", {"sbatch": ""})


def test_tokenize_dry_run(capsys, cfg, tmp_path):
    text = _dry(capsys, "tokenize", str(cfg), "--array", "8", "--max-parallel", "3", "--cpus-per-task", "4",
                "--time", "1:00:00", "--log-dir", str(tmp_path / "logs"), "--dry-run", "data.root=/x")
    array_part, final_part = text.split("# ---- finalize job")
    a, f = _sbatch_opts(array_part), _sbatch_opts(final_part)
    assert a["--array"] == "0-7%3" and a["--cpus-per-task"] == "4" and a["--output"].endswith("%x-%A_%a.out")
    assert f["--dependency"] == "afterok:<ARRAY_JOB_ID>" and f["--job-name"].endswith("-finalize")
    assert f"tokenize --no-progress {cfg} data.root=/x)" in array_part   # parts from SLURM_ARRAY_TASK_ID/COUNT
    assert f"tokenize --no-progress --finalize {cfg} data.root=/x)" in final_part
    for part in (array_part, final_part):
        subprocess.run(["bash", "-n"], input=part.split("\n", 1)[1], text=True, check=True)


def test_eval_cron_dry_run_both_modes(capsys, tmp_path):
    text = _dry(capsys, "eval-cron", str(tmp_path), "--every", "30m", "--mode", "resubmit", "-G", "1", "--dry-run",
                "--", "--vq", "/m/vq.safetensors", "--ref", "/m/ref.npz")
    o = _sbatch_opts(text)
    assert o["--job-name"] == f"argen-eval-{tmp_path.name}" and o["--gpus-per-node"] == "1"
    assert "EVERY_S=1800" in text and '--begin=now+$EVERY_S --dependency=singleton "$SELF"' in text
    assert f"SELF={tmp_path}/slurm/argen-eval-{tmp_path.name}.sbatch" in text
    assert f"eval watch {tmp_path} --once --vq /m/vq.safetensors --ref /m/ref.npz)" in text
    cron = _dry(capsys, "eval-cron", str(tmp_path), "--every", "2h", "--mode", "scrontab", "-p", "cpu", "--dry-run")
    assert "#SCRON --partition=cpu" in cron and f"\n0 */2 * * * {sys.executable} -m argen.cli eval watch {tmp_path} --once" in cron


def test_durations():
    assert slurm.parse_every("30m") == 1800 and slurm.parse_every("2h") == 7200 and slurm.parse_every("90s") == 90
    assert slurm.parse_every("1d") == 86400 and slurm.parse_every("15") == 900
    assert slurm.cron_spec(1800) == "*/30 * * * *" and slurm.cron_spec(3600) == "0 * * * *"
    assert slurm.cron_spec(86400) == "0 0 * * *"
    for bad in (2700, 90, 5 * 3600):
        with pytest.raises(ArgenError):
            slurm.cron_spec(bad)
    with pytest.raises(ArgenError):
        slurm.parse_every("soon")
    assert slurm.time_to_seconds("10") == 600 and slurm.time_to_seconds("1:00:00") == 3600
    assert slurm.time_to_seconds("2-03") == (2 * 24 + 3) * 3600 and slurm.time_to_seconds("5:30") == 330


def test_scaling_table_and_plot(tmp_path):
    jobs = []
    # 1 node: 1000 tok/s (first record is warm-up and is ignored); 2 nodes: 1800; 4 nodes: 3000
    for n, tps in ((1, 1000.0), (2, 1800.0), (4, 3000.0)):
        run = tmp_path / f"n{n}"
        run.mkdir()
        recs = [{"step": 1, "loss": 5.0, "tokens_per_s": 10.0, "mfu": 0.001}]
        recs += [{"step": s, "loss": 4.0, "tokens_per_s": tps * f, "mfu": 0.4 * tps / 1000 / n}
                 for s, f in ((2, 0.99), (3, 1.0), (4, 1.01))]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"step\": 5, \"lo")
        jobs.append({"nodes": n, "ranks": 2 * n, "job": str(100 + n), "run_dir": str(run)})
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    rows = scaling.collect(tmp_path)
    assert [r["nodes"] for r in rows] == [1, 2, 4]
    assert [round(r["tokens_per_s"]) for r in rows] == [1000, 1800, 3000]
    assert [round(r["efficiency"], 3) for r in rows] == [1.0, 0.9, 0.75]
    assert abs(rows[2]["mfu"] - 0.3) < 1e-9
    md = (tmp_path / "scaling.md").read_text()
    assert "| 2 | 4 | 102 | 1,800.0 | 450.0 | 1.80 | 0.90 | 36.00% |" in md
    csv_lines = (tmp_path / "scaling.csv").read_text().splitlines()
    assert csv_lines[0].startswith("nodes,ranks,job,state,tokens_per_s") and len(csv_lines) == 4
    png = (tmp_path / "scaling.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_scaling_without_metrics_says_where_it_looked(tmp_path):
    (tmp_path / "jobs.json").write_text(json.dumps([{"nodes": 1, "ranks": 1, "run_dir": str(tmp_path / "n1")}]))
    with pytest.raises(ArgenError, match="no run logged tokens_per_s"):
        scaling.collect(tmp_path)


def test_scontrol_line_parser():
    line = ("JobId=12 JobName=argen train ArrayJobId=10 ArrayTaskId=2 JobState=RUNNING Reason=None "
            "Command=/a/b c.sbatch WorkDir=/w StdOut=/w/x-12.out Comment=argen:run_dir=/r")
    rec = slurm._parse_kv_line(line)
    assert rec["JobName"] == "argen train" and rec["JobState"] == "RUNNING" and rec["Command"] == "/a/b c.sbatch"
    assert rec["Comment"] == "argen:run_dir=/r" and rec["ArrayTaskId"] == "2"


def test_no_slurm_client_gives_clear_error(monkeypatch, cfg, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(slurm.SlurmError, match="no Slurm client"):
        submit_cli.main(["train", str(cfg), "-G", "1", "--time", "10"])


def test_scrontab_install_replace_remove_keeps_other_entries(tmp_path, monkeypatch, capsys):
    """scrontab mode edits only argen's marked block. The local cluster (Debian's Slurm) has no scrontab, so a
    tiny stand-in `scrontab` (read with -l, replace with FILE, like the real one) holds the table here."""
    bin_dir, table = tmp_path / "bin", tmp_path / "table"
    bin_dir.mkdir()
    (bin_dir / "scrontab").write_text(
        f'#!/bin/bash\nif [ "$1" = -l ]; then [ -f {table} ] && exec cat {table}; echo "no crontab" >&2; exit 1; fi\n'
        f'cp "$1" {table}\n')
    (bin_dir / "scrontab").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    table.write_text("#SCRON --time=5\n0 0 * * * echo mine\n")
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    run_a.mkdir(), run_b.mkdir()
    base = ["eval-cron", "--mode", "scrontab"]
    assert submit_cli.main([*base[:1], str(run_a), *base[1:], "--every", "30m"]) == 0
    assert submit_cli.main([*base[:1], str(run_a), *base[1:], "--every", "1h", "--", "--num", "50"]) == 0
    assert submit_cli.main([*base[:1], str(run_b), *base[1:], "--every", "15m"]) == 0
    text = table.read_text()
    assert text.startswith("#SCRON --time=5\n0 0 * * * echo mine\n")
    assert text.count(f"# >>> argen eval-cron {run_a} >>>") == 1 and "*/30 * * * *" not in text
    assert f"0 * * * * {sys.executable} -m argen.cli eval watch {run_a} --once --num 50" in text
    assert f"*/15 * * * * {sys.executable} -m argen.cli eval watch {run_b} --once" in text
    assert f"#SCRON --output={run_a}/slurm/argen-eval-a.out" in text and (run_a / "slurm").is_dir()
    assert submit_cli.main([*base[:1], str(run_a), *base[1:], "--remove"]) == 0
    text = table.read_text()
    assert str(run_a) not in text and f"eval watch {run_b}" in text and "echo mine" in text
    with pytest.raises(ArgenError, match="divisor of 60"):
        submit_cli.main([*base[:1], str(run_a), *base[1:], "--every", "45m"])
