"""``python -m jsd``: see :mod:`jsd.cli`."""

from jsd.cli import main

if __name__ == "__main__":
    main()
