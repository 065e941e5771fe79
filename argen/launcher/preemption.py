"""Preemption and time-limit signals: ask the training loop to checkpoint at the next step boundary.

Slurm sends USR1 (`--signal=B:USR1@N`) to the batch script, which forwards it to the training tasks and then
requeues the job; a cluster that preempts with TERM gets the same treatment. The handler only sets a flag: saving
from inside a signal handler would interrupt a step half-way. The loops call `stop_requested()` once per step,
and in a multi-process job all ranks agree (any rank signalled -> all save), so the checkpoint is consistent.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

_requested = threading.Event()
_signal_name: list[str] = []


def _handler(signum, _frame) -> None:
    _signal_name.append(signal.Signals(signum).name)
    _requested.set()


def install(signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGTERM)) -> None:
    """Install the flag-setting handlers (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signals:
        signal.signal(s, _handler)


def request(reason: str = "manual") -> None:
    """Ask for a checkpoint-and-stop from code (tests, `argen train` time limits)."""
    _signal_name.append(reason)
    _requested.set()


def reset() -> None:
    _requested.clear()
    _signal_name.clear()


def reason() -> str | None:
    return _signal_name[-1] if _signal_name else None


def stop_requested() -> bool:
    """True on every rank once any rank was signalled (an all-reduce when a process group exists)."""
    local = _requested.is_set()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([1.0 if local else 0.0])
        if dist.get_backend() == "nccl":
            from argen import device as dev
            flag = flag.to(dev.default_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
    return local
