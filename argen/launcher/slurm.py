"""Slurm: render the sbatch templates in `slurm/`, submit them, and read job state without an accounting DB.

Everything here shells out to the long-stable Slurm CLI (`sbatch --parsable`, `scontrol show job -o`,
`squeue -h -o`, `scancel`), which behaves the same from 20.x to 25.x; `sacct` is used only when the cluster has
accounting storage. Nothing in argen imports this module except `argen submit` (submit_cli) and the scaling tool.

Templates are plain bash with `{{name}}` placeholders. `render()` replaces each with the value given (values are
already shell-quoted by the caller via `q()`/`words()`), and refuses placeholders it has no value for, so a typo in
an edited template fails at submit time with the template's name, not on the cluster an hour later.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from argen.errors import ArgenError

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_DIR = Path(os.environ.get("ARGEN_SLURM_TEMPLATES", REPO_ROOT / "slurm"))

# states after which a job will not run again by itself (REQUEUED/PREEMPTED jobs come back)
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "SPECIAL_EXIT", "REVOKED"}


class SlurmError(ArgenError):
    """A Slurm command failed or the cluster is not reachable; the message says which command and why."""


# ------------------------------------------------------------------------------------------------ quoting
def q(value) -> str:
    """One shell word."""
    return shlex.quote(str(value))


def words(items) -> str:
    """Several shell words (for bash arrays in templates: CMD=({{cmd}}))."""
    return " ".join(shlex.quote(str(i)) for i in items)


# ------------------------------------------------------------------------------------------------ durations
_DUR = re.compile(r"^\s*(\d+)\s*(s|sec|m|min|h|hr|d|day)?s?\s*$", re.I)


def parse_every(text: str) -> int:
    """'30m', '2h', '90s', '1d', '45' (minutes) -> seconds."""
    m = _DUR.match(str(text))
    if not m or int(m.group(1)) <= 0:
        raise ArgenError(f"--every {text!r}: use a positive number with a unit, e.g. 30m, 2h, 90s, 1d")
    n, unit = int(m.group(1)), (m.group(2) or "m").lower()[0]
    return n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def cron_spec(seconds: int) -> str:
    """Seconds -> a crontab schedule; only intervals a crontab can express evenly."""
    if seconds % 60:
        raise ArgenError(f"scrontab schedules have minute granularity; {seconds}s is not a whole number of minutes")
    minutes = seconds // 60
    if minutes < 60:
        if 60 % minutes:
            raise ArgenError(f"scrontab cannot run every {minutes} min evenly; use a divisor of 60 (e.g. 15m, 30m)")
        return "* * * * *" if minutes == 1 else f"*/{minutes} * * * *"
    if minutes % 60 == 0 and minutes // 60 < 24 and 24 % (minutes // 60) == 0:
        h = minutes // 60
        return "0 * * * *" if h == 1 else f"0 */{h} * * *"
    if minutes == 1440:
        return "0 0 * * *"
    raise ArgenError(f"scrontab cannot run every {minutes} min evenly; use e.g. 30m, 1h, 2h, 6h, 1d")


def check_time(text: str) -> str:
    """Validate a Slurm --time value: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    if not re.fullmatch(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}", str(text).strip()):
        raise ArgenError(f"--time {text!r}: use Slurm's format, e.g. 30 (minutes), 4:00:00, 2-00:00:00")
    return str(text).strip()


def time_to_seconds(text: str) -> int:
    text = check_time(text)
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")]
        parts += [0] * (3 - len(parts))  # D-HH[:MM[:SS]]
        h, m, s = parts
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return ((days * 24 + h) * 60 + m) * 60 + s


# ------------------------------------------------------------------------------------------------ templates
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_][a-z0-9_]*)\s*\}\}")


def template_path(name: str) -> Path:
    p = Path(name)
    if p.is_file():
        return p
    p = TEMPLATE_DIR / name
    if not p.is_file():
        raise ArgenError(f"Slurm template not found: {p} (set ARGEN_SLURM_TEMPLATES to a folder of templates)")
    return p


def render(template: str, values: dict) -> str:
    """Fill `{{name}}` placeholders of the template file `template` (name in slurm/ or a path)."""
    path = template_path(template)
    text = path.read_text()
    used = set(_PLACEHOLDER.findall(text))
    missing = sorted(used - set(values))
    if missing:
        raise ArgenError(f"template {path}: no value for placeholder(s) {', '.join('{{%s}}' % m for m in missing)}")
    return _PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), text)


@dataclasses.dataclass
class Resources:
    """The #SBATCH options argen writes; None/False means 'not written' (the cluster default applies)."""
    job_name: str
    nodes: int | None = 1
    ntasks_per_node: int | None = None
    ntasks: int | None = None
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    output: str | None = None
    error: str | None = None
    requeue: bool = False
    open_mode_append: bool = False
    signal: str | None = None
    array: str | None = None
    dependency: str | None = None
    begin: str | None = None
    chdir: str | None = None
    comment: str | None = None
    exclusive: bool = False
    extra: tuple[str, ...] = ()

    def directives(self) -> list[str]:
        opts: list[tuple[str, object]] = [
            ("job-name", self.job_name), ("nodes", self.nodes), ("ntasks", self.ntasks),
            ("ntasks-per-node", self.ntasks_per_node),
            ("gpus-per-node", self.gpus_per_node or None), ("cpus-per-task", self.cpus_per_task),
            ("mem", self.mem), ("time", self.time), ("partition", self.partition), ("account", self.account),
            ("qos", self.qos), ("constraint", self.constraint), ("array", self.array),
            ("dependency", self.dependency), ("begin", self.begin), ("chdir", self.chdir),
            ("output", self.output), ("error", self.error), ("signal", self.signal), ("comment", self.comment),
        ]
        lines = []
        for key, val in opts:
            if val is None or val == "":
                continue
            text = str(val)
            if '"' in text or "\n" in text:
                raise ArgenError(f"--{key} {text!r}: #SBATCH values cannot contain double quotes or newlines")
            if any(c.isspace() for c in text):
                text = f'"{text}"'  # sbatch understands double quotes in #SBATCH lines
            lines.append(f"#SBATCH --{key}={text}")
        if self.exclusive:
            lines.append("#SBATCH --exclusive")
        if self.requeue:
            lines.append("#SBATCH --requeue")
        if self.open_mode_append:
            lines.append("#SBATCH --open-mode=append")
        for e in self.extra:
            lines.append(f"#SBATCH {e}")
        return lines


# ------------------------------------------------------------------------------------------------ commands
def have_slurm() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("scontrol") is not None


def _run(args: list[str], timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"'{args[0]}' not found: this machine has no Slurm client (use --dry-run to see the script)")
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"'{' '.join(args)}' did not answer in {timeout:.0f}s (is slurmctld up? try 'scontrol ping')") from None
    if check and out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        raise SlurmError(f"'{' '.join(args)}' failed: {msg[-1] if msg else f'exit status {out.returncode}'}")
    return out


def sbatch(script: str | Path, args: list[str] = ()) -> str:
    """Submit a script file; returns the job id (for arrays: the array's job id)."""
    out = _run(["sbatch", "--parsable", *args, str(script)])
    job = out.stdout.strip().split(";")[0]
    if not job.isdigit():
        raise SlurmError(f"sbatch printed no job id: {out.stdout.strip()!r}")
    return job


def write_script(text: str, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def scancel(job: str, signal: str | None = None, batch: bool = False) -> None:
    args = ["scancel"]
    if signal:
        args.append(f"--signal={signal}")
    if batch:
        args.append("--batch")
    _run([*args, str(job)])


_config_cache: dict | None = None


def cluster_config(refresh: bool = False) -> dict:
    """`scontrol show config` as a dict (key -> value string)."""
    global _config_cache
    if _config_cache is None or refresh:
        out = _run(["scontrol", "show", "config"], timeout=20)
        cfg = {}
        for line in out.stdout.splitlines():
            if " = " in line:
                k, v = line.split(" = ", 1)
                cfg[k.strip()] = v.strip()
        _config_cache = cfg
    return _config_cache


def accounting_enabled() -> bool:
    if shutil.which("sacct") is None:
        return False
    try:
        return cluster_config().get("AccountingStorageType", "accounting_storage/none") != "accounting_storage/none"
    except SlurmError:
        return False


def scrontab_enabled() -> bool:
    if shutil.which("scrontab") is None:
        return False
    try:
        return "enable" in cluster_config().get("ScronParameters", "").lower()
    except SlurmError:
        return False


def _parse_kv_line(line: str) -> dict:
    """Parse one `scontrol show job -o` line. Values may contain spaces only in a few known keys (Command,
    WorkDir, StdOut, Comment ...), so split on ' Key=' boundaries."""
    out = {}
    for m in re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=(.*?)(?=\s[A-Za-z][A-Za-z0-9_:/]*=|$)", line.strip()):
        out[m.group(1)] = m.group(2).strip()
    return out


def show_job(job: str) -> list[dict]:
    """`scontrol show job -o JOB`: one dict per job record (arrays give one per task). [] if unknown."""
    out = _run(["scontrol", "show", "job", "-o", str(job)], check=False, timeout=20)
    if out.returncode != 0:
        err = (out.stderr or "").lower()
        if "invalid job id" in err:
            return []
        raise SlurmError(f"'scontrol show job {job}' failed: {(out.stderr or out.stdout).strip()}")
    return [_parse_kv_line(line) for line in out.stdout.splitlines() if line.strip()]


def squeue(job: str) -> list[dict]:
    fmt = "%i|%j|%T|%r|%M|%l|%D|%R"
    out = _run(["squeue", "-h", "-j", str(job), "-o", fmt], check=False, timeout=20)
    keys = ["JobId", "JobName", "JobState", "Reason", "RunTime", "TimeLimit", "NumNodes", "NodeList"]
    return [dict(zip(keys, line.split("|"))) for line in out.stdout.splitlines() if line.strip()] \
        if out.returncode == 0 else []


def sacct(job: str) -> list[dict]:
    fmt = "JobID,JobName,State,ExitCode,Elapsed,NNodes,NodeList,Start,End"
    out = _run(["sacct", "-n", "-P", "-X", "-j", str(job), "-o", fmt], check=False, timeout=30)
    if out.returncode != 0:
        return []
    keys = fmt.split(",")
    return [dict(zip(keys, line.split("|"))) for line in out.stdout.splitlines() if line.strip()]


def jobcomp_records(job: str) -> list[dict]:
    """Finished-job records from jobcomp/filetxt (outlive MinJobAge; readable on the controller host)."""
    try:
        cfg = cluster_config()
    except SlurmError:
        return []
    if cfg.get("JobCompType") != "jobcomp/filetxt":
        return []
    path = Path(cfg.get("JobCompLoc", ""))
    if not path.is_file():
        return []
    recs = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        rec = _parse_kv_line(line)
        if rec.get("JobId") == str(job):
            recs.append(rec)
    return recs


def state(job: str) -> str | None:
    """The base state (RUNNING, PENDING, COMPLETED, ...) of one job; None if Slurm has forgotten it."""
    recs = show_job(job)
    if not recs:
        recs = sacct(job) if accounting_enabled() else jobcomp_records(job)
        if not recs:
            return None
        s = recs[-1].get("JobState") or recs[-1].get("State") or ""
    else:
        s = recs[0].get("JobState", "")
    return s.split()[0] if s else None


def wait(jobs: list[str], timeout: float, poll: float = 2.0, quiet: bool = True) -> dict[str, str]:
    """Wait until every job (arrays: every task) is in a final state; returns job -> state.
    Raises SlurmError on timeout, naming the jobs still going."""
    end = time.monotonic() + timeout
    last: dict[str, str] = {}
    while True:
        pending = []
        for j in jobs:
            recs = show_job(j)
            if recs:
                states = [r.get("JobState", "?") for r in recs]
                bad = [s for s in states if s not in FINAL_STATES]
                last[j] = bad[0] if bad else next((s for s in states if s != "COMPLETED"), "COMPLETED")
            else:
                last[j] = state(j) or "UNKNOWN"
            if last[j] not in FINAL_STATES and last[j] != "UNKNOWN":
                pending.append(j)
        if not pending:
            return last
        if time.monotonic() > end:
            raise SlurmError(f"timed out after {timeout:.0f}s waiting for job(s) "
                             + ", ".join(f"{j} ({last[j]})" for j in pending))
        if not quiet:
            print("waiting: " + ", ".join(f"{j} {last[j]}" for j in pending), file=sys.stderr)
        time.sleep(poll)


# ------------------------------------------------------------------------------------------------ status
STATUS_KEYS = ["JobId", "ArrayJobId", "ArrayTaskId", "JobName", "JobState", "Reason", "ExitCode", "RunTime",
               "TimeLimit", "Restarts", "Requeue", "NumNodes", "NumTasks", "NodeList", "SubmitTime", "StartTime",
               "EndTime", "Dependency", "StdOut", "Comment"]


def status(job: str) -> tuple[str, list[dict]]:
    """(source, records): scontrol (live, and finished jobs for MinJobAge), then sacct if there is accounting,
    then the jobcomp text file."""
    recs = show_job(job)
    if recs:
        return "scontrol", [{k: r[k] for k in STATUS_KEYS if k in r and r[k] not in ("", "(null)")} for r in recs]
    if accounting_enabled():
        recs = sacct(job)
        if recs:
            return "sacct", recs
    recs = jobcomp_records(job)
    if recs:
        return "jobcomp", recs
    recs = squeue(job)
    if recs:
        return "squeue", recs
    return "none", []
