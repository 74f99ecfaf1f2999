"""Checkpoints that survive a kill at any moment.

``checkpoint-N/`` holds accelerate's ``save_state`` (trained weights, optimizer, LR scheduler, grad
scaler, RNG states, EMA) plus one ``training_state_R.pt`` per process (the loss generator, the data
stream positions, the bad-record counts). It is written as ``checkpoint-N.partial/`` and renamed
only once every process has finished, so ``latest`` never picks a half-written checkpoint.
The folder must be on a file system shared by all nodes.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
PARTIAL_SUFFIX = ".partial"


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (expected a name like checkpoint-500).")
    return int(match.group(1))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of ``run_dir``, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def resolve_resume(value: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from: ``None``, ``"latest"`` (None when there is none yet) or a folder."""
    if value is None:
        return None
    if value == "latest":
        checkpoints = list_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(value)
    if not path.is_dir():
        path = run_dir / value
    if not path.is_dir():
        raise FileNotFoundError(
            f"`--resume_from_checkpoint`={value!r}: no such checkpoint folder; use 'latest' or a path such as "
            f"{run_dir / 'checkpoint-500'}."
        )
    checkpoint_step(path)
    return path


def save_checkpoint(
    accelerator: Accelerator, run_dir: Path, step: int, rank_state: dict, *, total_limit: int | None
) -> Path:
    """Write ``run_dir/checkpoint-{step}`` atomically (all processes call this), then prune old ones."""
    final = run_dir / f"checkpoint-{step}"
    partial = run_dir / f"checkpoint-{step}{PARTIAL_SUFFIX}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    torch.save(rank_state, partial / f"training_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
        prune_checkpoints(run_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, total_limit: int | None) -> None:
    """Delete the oldest checkpoints beyond ``total_limit`` (only after a newer one is complete)."""
    if total_limit is None:
        return
    checkpoints = list_checkpoints(run_dir)
    for old in checkpoints[: max(len(checkpoints) - total_limit, 0)]:
        logger.info("Removing old checkpoint %s (--checkpoints_total_limit %d)", old, total_limit)
        shutil.rmtree(old)


def load_rank_state(checkpoint: Path, process_index: int, num_processes: int) -> dict:
    """This process's ``training_state_R.pt``; resuming needs the same number of processes."""
    path = checkpoint / f"training_state_{process_index}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: {checkpoint} was written by a different number of processes than the "
            f"{num_processes} of this run; resume with the same number of processes."
        )
    state = torch.load(path, weights_only=True)
    if state["num_processes"] != num_processes:
        raise ValueError(
            f"{checkpoint} was written by {state['num_processes']} processes, this run has {num_processes}: "
            "the data stream can only resume exactly with the same number."
        )
    return state
