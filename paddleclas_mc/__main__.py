"""``python -m paddleclas_mc COMMAND ...``, the same as the ``paddleclas-mc`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
