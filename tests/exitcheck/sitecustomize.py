"""Imported by every Python process a multi-process test starts (tests/processes.py puts this folder on PYTHONPATH).

At exit, each process that ``torchrun`` / ``accelerate launch`` started (it has ``RANK``) says on stderr whether its
process group is still open. One left open can abort the process in gloo's C++ threads after the work is done
("terminate called without an active exception": pytorch/pytorch#190489); the tests read these lines instead of
waiting for that race.
"""

import atexit
import os
import sys


def _report() -> None:
    distributed = sys.modules.get("torch.distributed")
    still_open = distributed is not None and distributed.is_available() and distributed.is_initialized()
    sys.stderr.write(f"exit check: rank {os.environ['RANK']} process group {'OPEN' if still_open else 'closed'}\n")
    sys.stderr.flush()


if "RANK" in os.environ:
    atexit.register(_report)  # registered first, so it runs after every handler the program registers
