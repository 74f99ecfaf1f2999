"""The state steps share (the weights folder, one loaded pipeline, ``predict.py``) and their small helpers."""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any
from unittest import mock

from acceptance.plan import GIB, REPO, Plan


class Context:
    """The run's settings and the resources steps share: the weights folder and one loaded pipeline."""

    def __init__(self, args: argparse.Namespace, plan: Plan) -> None:
        import torch

        self.args, self.plan = args, plan
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.workdir: Path = args.workdir
        self.weights_folder: Path | None = None
        self._pipe = None
        self._modules: dict[str, ModuleType] = {}

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def weights(self) -> Path:
        if self.weights_folder is None:
            raise RuntimeError("no weights: the set-up step (weights) failed")
        return self.weights_folder

    def pipeline(self):
        """The served checkpoint loaded as ``predict.py`` loads it (serving dtype, fast path), once."""
        if self._pipe is None:
            from jsd import serving
            from jsd.optimize import optimize_pipeline

            pipe = serving.load_pipeline(self.weights(), device=self.device)
            optimize_pipeline(pipe, self.device, compile=False, warmup=False)
            pipe.set_progress_bar_config(disable=True)
            self._pipe = pipe
        return self._pipe

    def release(self) -> None:
        """Drop the shared pipeline and return its memory (the next step that needs it loads it again)."""
        self._pipe = None
        free_memory()

    def repo_module(self, relative_path: str, name: str) -> ModuleType:
        """``predict.py`` or a script, executed once as a module (they are not a package)."""
        if name not in self._modules:
            self._modules[name] = sys.modules.get(name) or load_repo_module(relative_path, name)
        return self._modules[name]


def load_repo_module(relative_path: str, name: str) -> ModuleType:
    """Execute a file of the checkout (``predict.py``: not a package) as the module ``name``."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def free_memory() -> None:
    """Collect garbage and give CUDA's cached blocks back (between measurements)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def synchronize() -> None:
    """Wait for CUDA's queued work (timings end when the GPU is done); nothing without CUDA."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def gib(value: float | None) -> float | None:
    """Bytes in GiB, rounded for a report."""
    return None if value is None else round(value / GIB, 2)


def timed(owner: Any, name: str, seconds: dict[str, float], label: str) -> contextlib.AbstractContextManager:
    """While active, every call of ``owner.name`` adds its seconds (CUDA synchronised) to ``seconds[label]``.

    An attribute ``owner`` lacks is not timed (its label stays absent): a phase the code stops calling shows.
    """
    target = getattr(owner, name, None)
    if target is None:
        return contextlib.nullcontext()

    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return target(*args, **kwargs)
        finally:
            synchronize()
            seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - start

    # on a class, the bound classmethod is wrapped as a staticmethod (it keeps its class)
    return mock.patch.object(owner, name, staticmethod(wrapper) if isinstance(owner, type) else wrapper)


def last_line(text: str) -> str:
    """The last non-blank line of a process's output (what a report quotes)."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def half_mask(side: int):
    """An inpainting mask: white (repaint) in the middle half of a ``side``² image."""
    from PIL import Image

    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    return mask
