"""Training metrics: one line on the console, one JSON object per log step in RUN_DIR/metrics.jsonl, and wandb.

wandb runs online when credentials exist (WANDB_API_KEY or a netrc entry) and offline otherwise, writing real run
files under RUN_DIR/wandb that `wandb sync` can upload later; `log.wandb: off` disables it. The resolved config and
the git revision go into the run's config. Only rank 0 logs.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s of the devices, with the FLOPs per trained
token (forward + backward, no recomputation counted) from `flops_per_token`:
    6 * N_matmul                   weights touched by a token: every linear (qkv, wo, w1, w3, w2, output head) and the
                                   caption MLP; embedding lookups are not matmuls and are excluded
  + 12 * n_layer * dim * S / 2     causal attention scores and weighted values (QK^T and AV: 2 matmuls x 2 FLOPs x
                                   3 for fwd+bwd over the S/2 keys a causal query sees on average)
with S the training sequence length (prefix + image tokens - 1). Peak comes from argen.device.peak_flops
(bf16 dense, per device); on CPU set ARGEN_PEAK_FLOPS to get an MFU, otherwise it is reported as null.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # scaling.py reads metrics through this module on login nodes: no torch import
    from argen.model.gpt import GPTConfig


def flops_per_token(cfg: GPTConfig) -> float:
    d, L, h = cfg.dim, cfg.n_layer, cfg.ffn_hidden
    per_layer = 3 * d * d + d * d + 3 * d * h
    n_matmul = L * per_layer + d * cfg.vocab_size
    if cfg.model_type == "t2i":
        n_matmul += cfg.caption_dim * d + d * d
    S = cfg.seq_len
    return 6.0 * n_matmul + 12.0 * L * d * S / 2


def git_revision(cwd: str | None = None) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=cwd or Path(__file__).resolve().parents[2])
        rev = out.stdout.strip()
        if out.returncode == 0 and rev:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5, cwd=cwd or Path(__file__).resolve().parents[2]).stdout.strip()
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "unknown"


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; lines that do not parse (cut short by a killed job) are skipped."""
    recs = []
    if not path.is_file():
        return recs
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            recs.append(rec)
    return recs


def _wandb_mode(setting: str) -> str | None:
    if setting == "off" or os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true"):
        return None
    if setting in ("online", "offline"):
        return setting
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("offline", "online", "disabled"):
        return None if env_mode == "disabled" else env_mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool, config: dict, wandb_setting: str = "auto",
                 project: str = "argen", name: str = "", resume_step: int = 0):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        self.revision = git_revision()
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():  # drop lines past the resumed step (they will be redone)
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        mode = _wandb_mode(wandb_setting)
        if mode is not None:
            try:
                import wandb
                os.environ.setdefault("WANDB_SILENT", "true")
                self.wandb = wandb.init(project=project, name=name or run_dir.name, dir=str(run_dir), mode=mode,
                                        config={**config, "git_revision": self.revision}, resume="allow",
                                        id=_run_id(run_dir), settings=wandb.Settings(console="off"))
            except Exception as e:  # noqa: BLE001 - logging must never stop training
                print(f"[argen] wandb disabled: {e}", flush=True)
                self.wandb = None

    def log(self, record: dict[str, Any], console: str | None = None) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if console:
            print(console, flush=True)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and v is not None},
                           step=int(record.get("step", 0)))

    def info(self, msg: str) -> None:
        if self.enabled:
            print(f"[argen] {msg}", flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception:  # noqa: BLE001
                pass
            self.wandb = None


def _run_id(run_dir: Path) -> str:
    """A stable wandb run id per RUN_DIR, so a resumed job continues the same run."""
    f = run_dir / ".wandb_id"
    if f.is_file():
        return f.read_text().strip()
    import uuid
    rid = uuid.uuid4().hex[:12]
    f.write_text(rid)
    return rid
