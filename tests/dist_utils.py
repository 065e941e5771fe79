"""`run_distributed(fn, world_size, *args)`: run a module-level function in N spawned processes on gloo.

The usual launcher pattern for CPU process groups: a free port on 127.0.0.1, torch.multiprocessing spawn,
MASTER_ADDR/PORT, RANK/WORLD_SIZE/LOCAL_RANK and a thread cap set in each child before `fn(rank, *args)` runs.
The children initialise nothing themselves: argen's own launch detection (dist_env.init) reads those variables, so
the tests exercise the same path as torchrun. A wall-clock timeout kills only these children, by PID.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(local_rank: int, fn, world_size: int, port: int, env: dict, args: tuple) -> None:
    os.environ.update(env)
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(local_rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank), "LOCAL_WORLD_SIZE": str(world_size)})
    import torch
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world_size))
    try:
        fn(local_rank, *args)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


def run_distributed(fn, world_size: int, *args, timeout: float = 280.0, env: dict | None = None) -> None:
    """Run fn(rank, *args) on `world_size` gloo ranks; raises if any rank fails or the timeout passes."""
    port = free_port()
    base_env = {"DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    base_env.update(env or {})
    ctx = mp.start_processes(_child, args=(fn, world_size, port, base_env, args), nprocs=world_size, join=False,
                             start_method="spawn")
    import time
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed run of {fn.__name__} (world {world_size}) exceeded {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
