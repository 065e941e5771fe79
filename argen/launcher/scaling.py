"""Scaling experiments: collect throughput from the runs of `argen submit scaling` and write a table and a plot.

Layout of a scaling directory (written by `argen submit scaling`):

    OUT/jobs.json          [{"nodes": N, "ranks": R, "job": "123", "run_dir": "OUT/n1"}, ...]
    OUT/n1/metrics.jsonl   the trainer's log: one JSON object per log step with step, loss, tokens_per_s, mfu
    OUT/n2/metrics.jsonl   ...

`collect(OUT)` writes OUT/scaling.csv, OUT/scaling.md and OUT/scaling.png and returns the rows. Throughput of a run
is the median `tokens_per_s` over its log records after dropping the first one (warm-up: graph capture,
allocator, first data fetch), unless the run logged only one record. `tokens_per_s` is the whole job's rate.
Scaling efficiency = (tokens/s per rank at N) / (tokens/s per rank at the smallest size), so 1.0 is perfect.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from argen.errors import ArgenError
from argen.launcher.metrics_log import read_metrics


def _steady(values: list[float]) -> float | None:
    vals = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None
    if len(vals) > 1:
        vals = vals[1:]
    return float(statistics.median(vals))


def summarize_run(run_dir: Path) -> dict:
    recs = [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "tokens_per_s" in r]
    return {
        "log_records": len(recs),
        "tokens_per_s": _steady([r.get("tokens_per_s") for r in recs]),
        "mfu": _steady([r.get("mfu") for r in recs]),
        "last_step": recs[-1].get("step") if recs else None,
    }


def collect(out_dir: str | Path, plot: bool = True) -> list[dict]:
    out = Path(out_dir)
    jobs_file = out / "jobs.json"
    if not jobs_file.is_file():
        raise ArgenError(f"{jobs_file} not found: is {out} a directory written by `argen submit scaling`?")
    jobs = json.loads(jobs_file.read_text())
    rows = []
    for j in sorted(jobs, key=lambda j: (j["nodes"], j["ranks"])):
        s = summarize_run(Path(j["run_dir"]))
        rows.append({"nodes": j["nodes"], "ranks": j["ranks"], "job": j.get("job", ""),
                     "state": j.get("state", ""), **s})
    ok = [r for r in rows if r["tokens_per_s"]]
    if not ok:
        where = ", ".join(f"{Path(j['run_dir']) / 'metrics.jsonl'}" for j in jobs)
        raise ArgenError(f"no run logged tokens_per_s (looked in {where}); check the jobs' logs in {out}/*/slurm/")
    base = ok[0]
    base_per_rank = base["tokens_per_s"] / base["ranks"]
    for r in rows:
        if r["tokens_per_s"]:
            r["tokens_per_s_per_rank"] = r["tokens_per_s"] / r["ranks"]
            r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["efficiency"] = r["tokens_per_s_per_rank"] / base_per_rank
        else:
            r["tokens_per_s_per_rank"] = r["speedup"] = r["efficiency"] = None
    write_csv(rows, out / "scaling.csv")
    (out / "scaling.md").write_text(markdown(rows))
    if plot:
        write_plot(rows, out / "scaling.png")
    return rows


COLUMNS = ["nodes", "ranks", "job", "state", "tokens_per_s", "tokens_per_s_per_rank", "speedup", "efficiency", "mfu",
           "log_records", "last_step"]


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})


def _fmt(v, digits=1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def markdown(rows: list[dict]) -> str:
    lines = ["| nodes | ranks | job | tokens/s | tokens/s per rank | speedup | scaling efficiency | MFU |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mfu = "–" if r.get("mfu") is None else f"{100 * r['mfu']:.2f}%"
        lines.append(f"| {r['nodes']} | {r['ranks']} | {r.get('job', '')} | {_fmt(r['tokens_per_s'])} | "
                     f"{_fmt(r['tokens_per_s_per_rank'])} | {_fmt(r['speedup'], 2)} | {_fmt(r['efficiency'], 2)} | {mfu} |")
    return "\n".join(lines) + "\n"


def write_plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["tokens_per_s"]]
    nodes = [r["nodes"] for r in ok]
    tps = [r["tokens_per_s"] for r in ok]
    ideal = [ok[0]["tokens_per_s"] * r["ranks"] / ok[0]["ranks"] for r in ok]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(nodes, tps, "o-", label="measured")
    a.plot(nodes, ideal, "--", color="gray", label="linear")
    a.set_xlabel("nodes")
    a.set_ylabel("tokens/s")
    a.set_title("throughput")
    a.set_xticks(nodes)
    a.legend()
    b.plot(nodes, [r["efficiency"] for r in ok], "o-", color="C1")
    b.axhline(1.0, ls="--", color="gray")
    b.set_ylim(0, max(1.1, max(r["efficiency"] for r in ok) * 1.1))
    b.set_xlabel("nodes")
    b.set_ylabel("tokens/s per rank ÷ smallest run")
    b.set_title("scaling efficiency")
    b.set_xticks(nodes)
    if len(nodes) > 2 and nodes[-1] / nodes[0] >= 4:  # 1,2,4,8,...: evenly spaced on a log2 axis
        for ax in (a, b):
            ax.set_xscale("log", base=2)
            ax.set_xticks(nodes, [str(n) for n in nodes])
    mfu = [r["mfu"] for r in ok if r.get("mfu") is not None]
    if mfu:
        a.set_title(f"throughput (MFU {100 * min(mfu):.1f}–{100 * max(mfu):.1f}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
