"""The one line an entry script prints when it is started by a Python without the project's packages.

After `make demo`, ``python`` is the system Python: it has no torch, diffusers, cog or jsd, and a script
started with it would end in a traceback (``ModuleNotFoundError: No module named 'cog'``). Scripts catch
that error around their imports and exit with :func:`venv_hint` instead. This module uses the standard
library only (it must import where nothing else does). ``benchmarks/_venv.py`` is a link to it.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import NoReturn

VENV_PYTHON = Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python"


def venv_hint(err: ModuleNotFoundError, argv: list[str] | None = None) -> str:
    """``err`` and the command to run instead: the same arguments with the project's ``.venv/bin/python``.

    ``argv``: the words after the interpreter (default ``sys.argv``, i.e. the script and its arguments).
    """
    command = shlex.join([os.path.relpath(VENV_PYTHON), *(sys.argv if argv is None else argv)])
    return f"{err.msg}: {sys.executable} lacks this project's packages; run `make venv` once, then: {command}"


def exit_with_hint(module: str) -> NoReturn:
    """Exit with :func:`venv_hint` for a ``module`` found missing without importing it (``find_spec``)."""
    raise SystemExit(venv_hint(ModuleNotFoundError(f"No module named {module!r}", name=module)))
