"""``python -m jsd``: see :mod:`jsd.cli`."""

try:
    from jsd.cli import main
except ModuleNotFoundError as err:  # `python -m jsd` in the repository root, by a Python without its packages
    import os
    import shlex
    import sys
    from pathlib import Path

    venv_python = os.path.relpath(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "python")
    command = shlex.join([venv_python, "-m", "jsd", *sys.argv[1:]])
    raise SystemExit(
        f"{err.msg}: {sys.executable} lacks this project's packages; run `make venv` once, then: {command}"
    ) from None

if __name__ == "__main__":
    main()
