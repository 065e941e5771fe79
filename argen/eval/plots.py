"""Metrics against training step, one panel per metric and one line per (evaluation name, export variant)."""
from __future__ import annotations

from pathlib import Path

ORDER = ("fid", "sfid", "inception_score", "precision", "recall", "clip_score", "rfid", "psnr", "ssim")
LOWER_IS_BETTER = {"fid", "sfid", "rfid"}


def plot_metrics(records: list[dict], out: str | Path, title: str = "") -> Path | None:
    """Write a PNG of every metric in `records` against `step`; None when there is nothing to draw."""
    import matplotlib
    matplotlib.use("Agg")  # cron has no display
    import matplotlib.pyplot as plt

    names = [m for m in ORDER if any(m in r.get("metrics", {}) for r in records)]
    names += sorted({m for r in records for m in r.get("metrics", {})} - set(names))
    if not names:
        return None
    cols = min(3, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    series: dict[str, list[tuple[int, dict]]] = {}
    for r in records:
        label = r.get("name", "") + (f" ({r['variant']})" if r.get("variant") else "")
        series.setdefault(label, []).append((int(r.get("step", 0)), r.get("metrics", {})))
    for ax, metric in zip(axes.flat, names):
        for label, points in sorted(series.items()):
            pts = sorted((s, m[metric]) for s, m in points if metric in m)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
        ax.set_title(metric + (" (lower is better)" if metric in LOWER_IS_BETTER else ""), fontsize=9)
        ax.set_xlabel("training step", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if len(labels) > 1:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if len(labels) > 1 else 0, 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
