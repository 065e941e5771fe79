"""The tiny GPT training config and preemption helpers shared by the single-process and distributed training tests."""
from __future__ import annotations

import contextlib
import signal

STEPS = 6


def tiny_cfg(run_dir, model_type="c2i", **sections):
    from argen.config import load_config
    from argen.launcher.train_config import TrainConfig
    data = {
        "run_dir": str(run_dir),
        "model": {"name": "GPT-tiny", "model_type": model_type, "n_layer": 2, "n_head": 4, "dim": 64,
                  "vocab_size": 512, "num_classes": 10, "caption_dim": 32, "image_size": 64, "dropout": 0.0,
                  "token_dropout": 0.0, "class_dropout": 0.0},
        "data": {"source": "synthetic", "synthetic_samples": 64},
        # eps 1e-6 instead of 1e-8: Adam divides by sqrt(v) + eps, so for weights whose gradient is still ~0 (the
        # head starts at zero, so early FFN gradients are tiny) fp32 summation-order noise of 1e-7 would otherwise
        # be amplified into visible update differences; the parallel maths is what is under test here
        "optim": {"lr": 5e-3, "eps": 1e-6, "grad_clip": 1.0, "weight_decay": 0.05},
        "train": {"global_batch": 8, "max_steps": STEPS, "precision": "fp32", "checkpoint_every": 0},
        "log": {"every": 1, "wandb": "off"},
    }
    for sec, vals in sections.items():
        data.setdefault(sec, {}).update(vals)
    return load_config(TrainConfig, data=data)


def stop_at(step):
    """An on_step hook that requests a preemption stop at `step` (as SIGUSR1 would)."""
    def hook(s, _out):
        if s == step:
            from argen.launcher import preemption
            preemption.request("test")
    return hook


@contextlib.contextmanager
def kept_signal_handlers():
    """train() installs the preemption handlers (USR1/TERM set a flag); put the previous ones (pytest's) back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
