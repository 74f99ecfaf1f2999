"""A folder for a server's output files that does not outlive the server.

Cog reads a prediction's (or training's) output files after ``run()`` returns, so they cannot be deleted
then: they live in one folder per process (``{prefix}{pid}-…`` in the temporary directory), emptied by
each request and removed when the process ends:

* at a normal exit, by ``atexit``. coglet's worker exits normally when the server is stopped with SIGTERM
  or SIGINT to coglet itself (``docker stop``, ``kill PID``, Ctrl-C): coglet's orchestrator closes the
  control channel, the worker leaves its event loop (log: "Shutdown requested", "Worker exiting") and
  Python runs its exit handlers. The worker keeps SIGTERM at its default action (measured in coglet 0.23.1:
  ``signal.getsignal(SIGTERM)`` is ``SIG_DFL`` in ``setup()``, SIGINT ignored), so a SIGTERM sent to the
  worker as well — to the whole process group — ends it before any handler runs; ``scripts/cog_local.py``
  therefore stops coglet alone first;
* otherwise (killed, crashed): by the next :func:`process_folder` call with the same prefix, in any process,
  which removes the folders whose process no longer runs.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def process_folder(prefix: str) -> Path:
    """A new, empty folder ``{tempdir}/{prefix}{pid}-XXXX`` removed when this process exits.

    Folders with the same prefix left by processes that no longer run are removed first.
    """
    base = Path(tempfile.gettempdir())
    remove_orphans(base, prefix)
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=base))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def remove_orphans(base: Path, prefix: str) -> list[Path]:
    """Remove ``base/{prefix}{pid}-*`` folders whose process is gone; returns them."""
    removed = []
    for folder in base.glob(f"{prefix}*-*"):
        pid = folder.name.removeprefix(prefix).partition("-")[0]
        if folder.is_dir() and pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        logger.info("Removed %d folder(s) left by stopped servers: %s", len(removed), ", ".join(map(str, removed)))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
