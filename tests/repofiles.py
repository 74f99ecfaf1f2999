"""Load the repository's scripts and ``predict.py`` as modules, as coglet and ``python FILE`` do."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_repo_module(relative_path: str, name: str | None = None) -> ModuleType:
    """Execute ``REPO/relative_path`` as a fresh module (scripts and predict.py are not a package)."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
