"""`argen submit`: render the sbatch templates in slurm/ and submit training, tokenization, scheduled evaluation
and scaling jobs; show a job's status.

    argen submit train configs/gpt-b.yaml --nodes 4 --gpus-per-node 8 --time 2-00:00:00 --partition gpu
    argen submit train configs/gpt-tiny.yaml --nodes 2 --tasks-per-node 2 --time 10 --dry-run train.max_steps=50
    argen submit tokenize configs/tokenize-imagenet.yaml --array 64 --gpus-per-task 1
    argen submit eval-cron runs/gpt-b --every 30m --gpus-per-node 1 -- --vq models/vq16 --ref VIRTUAL_imagenet256_labeled.npz
    argen submit scaling configs/gpt-b.yaml --nodes 1,2,4,8 --gpus-per-node 8 --time 30 train.max_steps=200
    argen submit status 12345

Every submission writes the rendered script next to its logs (so what ran is on disk) and prints the job id.
`--dry-run` prints the script and submits nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from argen.errors import ArgenError
from argen.launcher import slurm
from argen.launcher.slurm import q, words

RUN_DIR_KEY = "run_dir"      # the trainer's config key for its output directory (checkpoints, metrics, exports)
RESUME_KEY = "train.resume"  # the trainer's config key: auto = newest checkpoint in the run dir, if any
DEFAULT_SIGNAL_LEAD_S = 120   # USR1 this long before the time limit (Slurm delivers it within ~30 s of that)


# ------------------------------------------------------------------------------------------------ helpers
def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def _python(args) -> str:
    return args.python or sys.executable


def _config_value(config: str, overrides: list[str], dotted: str):
    """Look up a dotted key in the YAML recipe (with `base:` chains) and the overrides, without building the
    trainer's dataclasses (submit must not import the training stack)."""
    from argen.config import read_yaml, parse_overrides, _merge
    data = _merge(read_yaml(config), parse_overrides(overrides))
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "job"


def _check_overrides(overrides: list[str]) -> list[str]:
    for o in overrides:
        if "=" not in o or o.startswith("-"):
            raise ArgenError(f"unexpected argument {o!r}: overrides look like key.sub=value (options go before them)")
    return overrides


def _add_common(p: argparse.ArgumentParser, time_default: str | None = None) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--time", default=time_default, help="time limit, Slurm format: MIN, HH:MM:SS, D-HH:MM:SS"
                   + (f" (default {time_default})" if time_default else ""))
    g.add_argument("--partition", "-p", help="partition (default: the cluster's default)")
    g.add_argument("--account", "-A", help="account to charge")
    g.add_argument("--qos", help="quality of service")
    g.add_argument("--constraint", "-C", help="node features, e.g. 'h100&ib'")
    g.add_argument("--mem", help="memory per node, e.g. 200G (default: the cluster's default)")
    g.add_argument("--exclusive", action="store_true", help="whole nodes only")
    g.add_argument("--job-name", "-J", help="job name (default: argen-<kind>-<config name>)")
    g.add_argument("--log-dir", help="where the rendered script and the job's log go")
    g.add_argument("--python", help=f"python that runs argen on the nodes (default: {sys.executable})")
    g.add_argument("--sbatch-arg", action="append", default=[], metavar="OPT",
                   help="extra #SBATCH option written as is, e.g. --sbatch-arg=--reservation=big (repeatable)")
    g.add_argument("--dry-run", action="store_true", help="print the rendered script(s) and submit nothing")


def _base_resources(args, job_name: str) -> slurm.Resources:
    return slurm.Resources(
        job_name=job_name, time=slurm.check_time(args.time) if args.time else None, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem, exclusive=args.exclusive,
        chdir=os.getcwd(), extra=tuple(args.sbatch_arg))


def _emit(text: str, path: Path, dry_run: bool, label: str = "") -> None:
    if dry_run:
        if label:
            print(f"# ---- {label} (would be written to {path})")
        print(text, end="" if text.endswith("\n") else "\n")
    else:
        slurm.write_script(text, path)


def _layout(args) -> tuple[int, int, int | None]:
    """(gpus_per_node, tasks_per_node, cpus_per_task): one task per GPU, or --tasks-per-node CPU ranks."""
    gpus = args.gpus_per_node or 0
    if gpus < 0:
        raise ArgenError("--gpus-per-node must be >= 0")
    tasks = args.tasks_per_node
    if gpus and tasks and tasks != gpus:
        raise ArgenError(f"--tasks-per-node {tasks} with --gpus-per-node {gpus}: argen runs one task per GPU; "
                         "drop --tasks-per-node")
    tasks = tasks or gpus
    if not tasks:
        raise ArgenError("give --gpus-per-node G (one task per GPU) or, on CPU nodes, --tasks-per-node T")
    if tasks < 1:
        raise ArgenError("--tasks-per-node must be >= 1")
    return gpus, tasks, args.cpus_per_task


def _add_layout(p: argparse.ArgumentParser, nodes: bool = True) -> None:
    g = p.add_argument_group("layout")
    if nodes:
        g.add_argument("--nodes", "-N", type=int, default=1, help="number of nodes (default 1)")
    g.add_argument("--gpus-per-node", "-G", type=int, default=0, help="GPUs per node; one task (rank) per GPU")
    g.add_argument("--tasks-per-node", "--cpus-per-node", dest="tasks_per_node", type=int,
                   help="ranks per node on CPU nodes (default: --gpus-per-node)")
    g.add_argument("--cpus-per-task", "-c", type=int, help="CPU cores per rank (data loading threads, OMP)")


# ------------------------------------------------------------------------------------------------ train
def _train_run_dir(config: str, overrides: list[str]) -> tuple[Path, list[str]]:
    """The run directory as an absolute path, passed to the trainer explicitly (the job may start elsewhere)."""
    out_dir = _config_value(config, overrides, RUN_DIR_KEY)
    run_dir = Path(str(out_dir) if out_dir else Path("runs", Path(config).stem)).resolve()
    return run_dir, [*[o for o in overrides if not o.startswith(RUN_DIR_KEY + "=")], f"{RUN_DIR_KEY}={run_dir}"]


def render_train(config: str, overrides: list[str], *, nodes: int, gpus_per_node: int, tasks_per_node: int,
                 cpus_per_task: int | None, resources: slurm.Resources, run_dir: Path, log_dir: Path,
                 python: str, signal_lead_s: int = DEFAULT_SIGNAL_LEAD_S, requeue: bool = True,
                 entry: list[str] | None = None, resume: list[str] | None = None) -> str:
    """The training batch script. `entry` replaces `-m argen train CONFIG` (tests use a stand-in trainer)."""
    if nodes < 1:
        raise ArgenError("--nodes must be >= 1")
    r = resources
    r.nodes, r.ntasks_per_node, r.gpus_per_node, r.cpus_per_task = nodes, tasks_per_node, gpus_per_node, cpus_per_task
    r.output = str(log_dir / "%x-%j.out")
    r.requeue = requeue
    r.open_mode_append = True
    r.signal = f"B:USR1@{signal_lead_s}"
    r.comment = f"argen:run_dir={run_dir}"
    if r.time and slurm.time_to_seconds(r.time) <= signal_lead_s:
        raise ArgenError(f"--time {r.time} is not longer than --signal-lead {signal_lead_s}s: the job would be "
                         "asked to checkpoint before it starts")
    if resume is None:  # resume from the newest checkpoint unless the user chose otherwise
        resume = [] if any(o.startswith(RESUME_KEY + "=") for o in overrides) else [f"{RESUME_KEY}=auto"]
    cmd = [python, *(entry if entry is not None else ["-m", "argen.cli", "train", str(Path(config).resolve())]),
           *overrides]
    return slurm.render("train.sbatch", {
        "sbatch": "\n".join(r.directives()),
        "run_dir": q(run_dir), "train_cmd": words(cmd), "resume": words(resume),
        "gpus_per_node": gpus_per_node, "tasks_per_node": tasks_per_node,
    })


def cmd_train(args) -> int:
    overrides = _check_overrides(args.overrides)
    if not Path(args.config).is_file():
        raise ArgenError(f"config file not found: {args.config}")
    gpus, tasks, cpt = _layout(args)
    run_dir, overrides = _train_run_dir(args.config, overrides)
    log_dir = Path(args.log_dir).resolve() if args.log_dir else run_dir / "slurm"
    name = args.job_name or f"argen-train-{_slug(Path(args.config).stem)}"
    text = render_train(args.config, overrides, nodes=args.nodes, gpus_per_node=gpus, tasks_per_node=tasks,
                        cpus_per_task=cpt, resources=_base_resources(args, name), run_dir=run_dir, log_dir=log_dir,
                        python=_python(args), signal_lead_s=args.signal_lead, requeue=not args.no_requeue)
    path = log_dir / f"{name}-{_stamp()}.sbatch"
    _emit(text, path, args.dry_run)
    if args.dry_run:
        return 0
    job = slurm.sbatch(path)
    print(f"submitted training job {job}: {args.nodes} node(s) x {tasks} rank(s), run dir {run_dir}")
    print(f"  log:    {log_dir}/{name}-{job}.out")
    print(f"  status: argen submit status {job}    stop: scancel {job}    checkpoint+requeue: "
          f"scancel --signal=USR1 --batch {job}")
    return 0


# ------------------------------------------------------------------------------------------------ tokenize
def cmd_tokenize(args) -> int:
    overrides = _check_overrides(args.overrides)
    if not Path(args.config).is_file():
        raise ArgenError(f"config file not found: {args.config}")
    if args.array < 1:
        raise ArgenError("--array must be >= 1 (number of parts)")
    cfg = str(Path(args.config).resolve())
    python = _python(args)
    name = args.job_name or f"argen-tokenize-{_slug(Path(args.config).stem)}"
    log_dir = Path(args.log_dir).resolve() if args.log_dir else Path("slurm-logs", name).resolve()
    stamp = _stamp()

    r = _base_resources(args, name)
    r.nodes, r.ntasks = 1, 1
    r.cpus_per_task = args.cpus_per_task
    r.gpus_per_node = args.gpus_per_task or 0
    r.array = f"0-{args.array - 1}" + (f"%{args.max_parallel}" if args.max_parallel else "")
    r.output = str(log_dir / "%x-%A_%a.out")
    array_text = slurm.render("tokenize.sbatch", {
        "sbatch": "\n".join(r.directives()),
        "tokenize_cmd": words([python, "-m", "argen.cli", "tokenize", "--no-progress", cfg, *overrides]),
    })
    array_path = log_dir / f"{name}-{stamp}.sbatch"

    def finalize_text(array_job: str) -> str:
        f = _base_resources(args, f"{name}-finalize")
        f.nodes, f.ntasks = 1, 1
        f.time = slurm.check_time(args.finalize_time)
        f.dependency = f"afterok:{array_job}"
        f.output = str(log_dir / "%x-%j.out")
        return slurm.render("tokenize-finalize.sbatch", {
            "sbatch": "\n".join(f.directives()), "array_job": array_job,
            "finalize_cmd": words([python, "-m", "argen.cli", "tokenize", "--no-progress", "--finalize", cfg,
                                   *overrides]),
        })

    final_path = log_dir / f"{name}-finalize-{stamp}.sbatch"
    if args.dry_run:
        _emit(array_text, array_path, True, f"array job, {args.array} part(s)")
        _emit(finalize_text("<ARRAY_JOB_ID>"), final_path, True, "finalize job")
        return 0
    _emit(array_text, array_path, False)
    array_job = slurm.sbatch(array_path)
    _emit(finalize_text(array_job), final_path, False)
    try:
        final_job = slurm.sbatch(final_path)
    except slurm.SlurmError:
        slurm.scancel(array_job)
        raise
    print(f"submitted tokenization: array job {array_job} ({args.array} parts), finalize job {final_job} "
          f"(afterok:{array_job})")
    print(f"  logs: {log_dir}/")
    print(f"  status: argen submit status {array_job}; argen submit status {final_job}")
    return 0


# ------------------------------------------------------------------------------------------------ eval-cron
def _existing_jobs(name: str) -> list[str]:
    out = slurm._run(["squeue", "-h", "--me", "--name", name, "-o", "%i"], check=False)
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


_SCRON_BEGIN = "# >>> argen eval-cron {} >>>"
_SCRON_END = "# <<< argen eval-cron {} <<<"


def _scrontab_update(key: str, block: str | None) -> None:
    """Replace (or remove, block=None) our marked block in the user's scrontab, keeping every other entry."""
    cur = slurm._run(["scrontab", "-l"], check=False)
    lines = cur.stdout.splitlines() if cur.returncode == 0 else []
    begin, end = _SCRON_BEGIN.format(key), _SCRON_END.format(key)
    out, skip = [], False
    for line in lines:
        if line == begin:
            skip = True
            continue
        if line == end:
            skip = False
            continue
        if not skip:
            out.append(line)
    if block is not None:
        out += [begin, *block.rstrip("\n").splitlines(), end]
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".scrontab", delete=False) as f:
        f.write("\n".join(out) + "\n")
    try:
        slurm._run(["scrontab", f.name])
    finally:
        os.unlink(f.name)


def cmd_eval_cron(args) -> int:
    run_dir = Path(args.run_dir).resolve()
    if not args.dry_run and not run_dir.is_dir():
        raise ArgenError(f"run directory not found: {args.run_dir}")
    every_s = slurm.parse_every(args.every)
    name = args.job_name or f"argen-eval-{_slug(run_dir.name)}"
    log_dir = Path(args.log_dir).resolve() if args.log_dir else run_dir / "slurm"
    python = _python(args)
    eval_cmd = [python, "-m", "argen.cli", "eval", "watch", str(run_dir), "--once", *args.eval_arg]
    mode = args.mode
    if mode == "auto":
        mode = "scrontab" if (not args.dry_run or slurm.have_slurm()) and slurm.scrontab_enabled() else "resubmit"

    if mode == "scrontab":
        if args.remove:
            _scrontab_update(str(run_dir), None)
            print(f"removed the scrontab entry for {run_dir}")
            return 0
        extra = []
        for opt, val in (("partition", args.partition), ("account", args.account), ("qos", args.qos),
                         ("constraint", args.constraint), ("mem", args.mem),
                         ("gpus-per-node", args.gpus_per_node or None), ("cpus-per-task", args.cpus_per_task)):
            if val:
                extra.append(f"#SCRON --{opt}={val}")
        extra += [f"#SCRON {a}" for a in args.sbatch_arg]
        block = slurm.render("eval.scrontab", {
            "run_dir": run_dir, "job_name": name, "time": slurm.check_time(args.time),
            "log": log_dir / f"{name}.out", "scron_extra": "".join(e + "\n" for e in extra),
            "cron": slurm.cron_spec(every_s), "eval_cmd": words(eval_cmd),
        })
        if args.dry_run:
            print(block, end="")
            return 0
        log_dir.mkdir(parents=True, exist_ok=True)
        _scrontab_update(str(run_dir), block)
        print(f"installed scrontab entry '{name}' ({slurm.cron_spec(every_s)}): evaluates {run_dir}")
        print(f"  log: {log_dir}/{name}.out    see: scrontab -l    remove: argen submit eval-cron {args.run_dir} --remove")
        return 0

    # resubmit mode: a job that queues its successor with --begin
    if args.remove:
        jobs = _existing_jobs(name)
        for j in jobs:
            slurm.scancel(j)
        print(f"cancelled {len(jobs)} job(s) named {name}" + (f": {' '.join(jobs)}" if jobs else ""))
        return 0
    script_path = log_dir / f"{name}.sbatch"
    r = _base_resources(args, name)
    r.time = slurm.check_time(args.time)
    r.nodes, r.ntasks = 1, 1
    r.gpus_per_node = args.gpus_per_node or 0
    r.cpus_per_task = args.cpus_per_task
    r.output = str(log_dir / f"{name}.out")
    r.open_mode_append = True
    r.comment = f"argen:run_dir={run_dir}"
    text = slurm.render("eval-cron.sbatch", {
        "sbatch": "\n".join(r.directives()), "every_s": every_s, "job_name": name,
        "script_path": q(script_path), "eval_cmd": words(eval_cmd), "run_dir": q(run_dir),
    })
    _emit(text, script_path, args.dry_run)
    if args.dry_run:
        return 0
    existing = _existing_jobs(name)
    if existing:
        if not args.replace:
            slurm.write_script(text, script_path)  # the next link of the chain picks up the new script
            raise ArgenError(f"an evaluation chain for {run_dir} is already queued (job(s) {' '.join(existing)}); "
                             f"its next run uses the updated script. To restart it now: --replace; to stop it: --remove")
        for j in existing:
            slurm.scancel(j)
    job = slurm.sbatch(script_path)
    print(f"submitted evaluation chain '{name}': job {job} now, then every {args.every} (resubmits itself with --begin)")
    print(f"  log: {log_dir}/{name}.out    stop: argen submit eval-cron {args.run_dir} --remove  (or scancel --name={name})")
    return 0


# ------------------------------------------------------------------------------------------------ scaling
def cmd_scaling(args) -> int:
    return run_scaling(args)


def run_scaling(args, entry: list[str] | None = None) -> int:
    """`argen submit scaling`; `entry` replaces `-m argen.cli train CONFIG` (tests use a stand-in trainer)."""
    from argen.launcher import scaling
    if args.collect:
        rows = scaling.collect(args.collect)
        print(scaling.markdown(rows), end="")
        print(f"wrote {Path(args.collect) / 'scaling.md'}, scaling.csv, scaling.png")
        return 0
    if not args.config:
        raise ArgenError("give CONFIG (or --collect OUT to rebuild the table of finished runs)")
    overrides = _check_overrides(args.overrides)
    if not Path(args.config).is_file():
        raise ArgenError(f"config file not found: {args.config}")
    try:
        sizes = sorted({int(n) for n in args.nodes.split(",") if n.strip()})
    except ValueError:
        raise ArgenError(f"--nodes {args.nodes!r}: give node counts like 1,2,4,8") from None
    if not sizes or sizes[0] < 1:
        raise ArgenError(f"--nodes {args.nodes!r}: give node counts >= 1 like 1,2,4,8")
    if any(o.startswith(RUN_DIR_KEY + "=") for o in overrides):
        raise ArgenError(f"scaling sets {RUN_DIR_KEY} per run itself; use --out DIR instead")
    gpus, tasks, cpt = _layout(args)
    stem = _slug(Path(args.config).stem)
    out = Path(args.out or f"runs/scaling-{stem}").resolve()
    python = _python(args)
    runs = []
    for n in sizes:
        run_dir = out / f"n{n}"
        if not args.dry_run and (run_dir / "metrics.jsonl").exists():
            raise ArgenError(f"{run_dir} already holds a run; choose another --out (a resumed run would "
                             "measure nothing)")
        name = f"{args.job_name or 'argen-scale-' + stem}-n{n}"
        text = render_train(args.config, [*overrides, f"{RUN_DIR_KEY}={run_dir}"], nodes=n, gpus_per_node=gpus,
                            tasks_per_node=tasks, cpus_per_task=cpt, resources=_base_resources(args, name),
                            run_dir=run_dir, log_dir=run_dir / "slurm", python=python, requeue=False,
                            signal_lead_s=args.signal_lead, resume=[], entry=entry)
        runs.append((n, run_dir, name, text))
    if args.dry_run:
        for n, run_dir, name, text in runs:
            _emit(text, run_dir / "slurm" / f"{name}.sbatch", True, f"{n} node(s)")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for n, run_dir, name, text in runs:
        path = slurm.write_script(text, run_dir / "slurm" / f"{name}-{_stamp()}.sbatch")
        job = slurm.sbatch(path)
        jobs.append({"nodes": n, "ranks": n * tasks, "job": job, "run_dir": str(run_dir)})
        print(f"submitted {n} node(s) x {tasks} rank(s): job {job}")
    (out / "jobs.json").write_text(json.dumps(jobs, indent=1))
    if args.no_wait:
        print(f"not waiting; when the jobs are done: argen submit scaling --collect {out}")
        return 0
    print(f"waiting for {len(jobs)} job(s) (up to {args.wait_timeout}s) ...", flush=True)
    states = slurm.wait([j["job"] for j in jobs], timeout=args.wait_timeout, poll=args.poll)
    for j in jobs:
        j["state"] = states.get(j["job"], "")
    (out / "jobs.json").write_text(json.dumps(jobs, indent=1))
    failed = [j for j in jobs if j["state"] != "COMPLETED"]
    rows = scaling.collect(out)
    print(scaling.markdown(rows), end="")
    print(f"wrote {out}/scaling.md, scaling.csv, scaling.png")
    if failed:
        print("some runs did not complete: " + ", ".join(f"{j['nodes']} node(s) job {j['job']} {j['state']}"
                                                      for j in failed), file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------ status
def _last_metrics(run_dir: Path) -> dict | None:
    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return None
    for line in reversed(p.read_text().splitlines()):
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue
    return None


def cmd_status(args) -> int:
    source, recs = slurm.status(args.job)
    if args.json:
        print(json.dumps({"job": args.job, "source": source, "records": recs}, indent=1))
        return 0 if recs else 1
    if not recs:
        print(f"job {args.job}: unknown to Slurm (not in scontrol/squeue"
              + (", sacct" if slurm.accounting_enabled() else "; no accounting database, jobcomp log has no record")
              + ")", file=sys.stderr)
        return 1
    print(f"job {args.job} (from {source}):")
    for r in recs:
        width = max(len(k) for k in r)
        for k, v in r.items():
            print(f"  {k:<{width}}  {v}")
        comment = r.get("Comment", "")
        if comment.startswith("argen:run_dir="):
            m = _last_metrics(Path(comment.split("=", 1)[1]))
            if m:
                print("  last metrics  " + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in m.items()))
        if len(recs) > 1:
            print()
    return 0


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="argen submit", description=__doc__.split("\n\n")[0],
        epilog="Templates: slurm/*.sbatch (edit them, or point ARGEN_SLURM_TEMPLATES at your own copies). "
               "See the README, 'Running argen on Slurm'.", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="{train,tokenize,eval-cron,scaling,status}")

    t = sub.add_parser("train", help="submit a (multi-node) training job that checkpoints and requeues on preemption",
                       description="Render slurm/train.sbatch and submit it: one srun task per GPU (or per CPU "
                                   "rank), rendezvous on the first node, USR1 before the time limit -> checkpoint "
                                   "-> requeue -> resume.")
    t.add_argument("config", help="training recipe (YAML)")
    t.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    _add_layout(t)
    _add_common(t)
    t.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD_S, metavar="S",
                   help=f"send USR1 S seconds before the time limit (default {DEFAULT_SIGNAL_LEAD_S}; Slurm is "
                        "accurate to ~30 s, so leave room for one step plus a checkpoint)")
    t.add_argument("--no-requeue", action="store_true", help="on USR1 checkpoint and stop, do not requeue")
    t.set_defaults(func=cmd_train)

    k = sub.add_parser("tokenize", help="offline tokenization as a K-part job array plus a finalize job",
                       description="Submit `argen tokenize CONFIG` as a job array of K parts, then a finalize job "
                                   "(--dependency=afterok:<array>) that checks the parts and writes the manifest.")
    k.add_argument("config", help="tokenization recipe (YAML)")
    k.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    k.add_argument("--array", type=int, required=True, metavar="K", help="number of parts (array tasks)")
    k.add_argument("--max-parallel", type=int, metavar="M", help="run at most M parts at once (--array=...%%M)")
    k.add_argument("--gpus-per-task", type=int, default=0, help="GPUs per part (default 0)")
    k.add_argument("--cpus-per-task", "-c", type=int, help="CPU cores per part")
    k.add_argument("--finalize-time", default="30", help="time limit of the finalize job (default 30 min)")
    _add_common(k)
    k.set_defaults(func=cmd_tokenize)

    e = sub.add_parser("eval-cron", help="evaluate a run's new checkpoints on a schedule",
                       description="Install a recurring `argen eval watch RUN_DIR --once [ARGS after --]`: a "
                                   "scrontab entry where the cluster enables scrontab, else a job that resubmits "
                                   "itself with --begin.",
                       epilog="Arguments after `--` go to `argen eval watch` (e.g. -- --vq VQ --ref REF).")
    e.add_argument("run_dir", help="training run directory to watch")
    e.add_argument("--every", default="30m", help="interval: 30m, 2h, 1d, 90s (default 30m)")
    e.add_argument("--mode", choices=["auto", "scrontab", "resubmit"], default="auto",
                   help="auto: scrontab if the cluster enables it (ScronParameters=enable), else resubmit")
    e.add_argument("--remove", action="store_true", help="stop the schedule for RUN_DIR")
    e.add_argument("--replace", action="store_true", help="restart a chain that is already queued")
    e.add_argument("--gpus-per-node", "-G", type=int, default=0, help="GPUs for the evaluation job")
    e.add_argument("--cpus-per-task", "-c", type=int, help="CPU cores for the evaluation job")
    e.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `argen eval watch` (repeatable)")
    _add_common(e, time_default="1:00:00")
    e.set_defaults(func=cmd_eval_cron)

    s = sub.add_parser("scaling", help="the same short run at several node counts -> throughput table and plot",
                       description="Submit the same short training run at each node count, wait, and write "
                                   "OUT/scaling.md, scaling.csv and scaling.png (tokens/s, MFU, efficiency).")
    s.add_argument("config", nargs="?", help="training recipe (YAML); keep the run short (e.g. train.max_steps=..)")
    s.add_argument("overrides", nargs="*", help="config overrides key.sub=value (applied to every run)")
    s.add_argument("--nodes", "-N", default="1,2,4,8", help="node counts, comma separated (default 1,2,4,8)")
    _add_layout(s, nodes=False)
    s.add_argument("--out", help="scaling directory (default runs/scaling-<config>); run i goes to OUT/n<nodes>")
    s.add_argument("--no-wait", action="store_true", help="submit and return; collect later with --collect OUT")
    s.add_argument("--collect", metavar="OUT", help="only rebuild the table and plot from finished runs in OUT")
    s.add_argument("--wait-timeout", type=int, default=24 * 3600, metavar="S", help="give up waiting after S s")
    s.add_argument("--poll", type=float, default=10.0, metavar="S", help="poll interval while waiting (default 10)")
    s.add_argument("--signal-lead", type=int, default=DEFAULT_SIGNAL_LEAD_S, metavar="S", help=argparse.SUPPRESS)
    _add_common(s, time_default="30")
    s.set_defaults(func=cmd_scaling)

    st = sub.add_parser("status", help="a job's state (scontrol/squeue; sacct when the cluster has accounting)")
    st.add_argument("job", help="job id (array: the array job id)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough: list[str] = []
    if argv and argv[0] == "eval-cron" and "--" in argv:  # eval-cron RUN_DIR ... -- <args for argen eval watch>
        cut = argv.index("--")
        argv, passthrough = argv[:cut], argv[cut + 1:]
    # overrides may come before or after options: collect the key=value words argparse left over
    args, extra = parser.parse_known_args(argv)
    if passthrough:
        args.eval_arg = [*args.eval_arg, *passthrough]
    if extra:
        if not hasattr(args, "overrides") or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args) or 0


if __name__ == "__main__":
    sys.exit(main())
