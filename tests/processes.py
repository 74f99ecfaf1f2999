"""Commands that start several CPU processes (``accelerate launch``, ``torchrun``) and what each process did at exit."""

from __future__ import annotations

import os
import re
import socket
import sys
from pathlib import Path

EXIT_CHECK = Path(__file__).resolve().with_name("exitcheck")  # its sitecustomize.py reports each rank at exit


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str, processes: int = 2) -> list[str]:
    """accelerate's 2-process CPU command (docs/fine-tuning.md), on a free port (other runs may hold the default)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "--main_process_port", str(free_port()), "-m", "jsd", *args]


def with_exit_check(env: dict[str, str]) -> dict[str, str]:
    """``env`` with the exit check on PYTHONPATH: every started rank says at exit whether its group is open."""
    path = os.pathsep.join(p for p in (str(EXIT_CHECK), env.get("PYTHONPATH", "")) if p)
    return env | {"PYTHONPATH": path}


def child_env() -> dict[str, str]:
    """One thread per process (2 cores), no GPU, unbuffered output, and the exit check."""
    return with_exit_check(os.environ | {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""})


def groups_at_exit(stderr: str) -> dict[int, str]:
    """rank -> 'closed' or 'OPEN', as each started process reported it at exit."""
    return {
        int(rank): state for rank, state in re.findall(r"^exit check: rank (\d+) process group (\w+)$", stderr, re.M)
    }


def assert_every_process_closed_its_group(stderr: str, processes: int = 2) -> None:
    assert groups_at_exit(stderr) == dict.fromkeys(range(processes), "closed"), stderr[-3000:]
