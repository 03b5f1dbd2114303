"""``python -m fastglow`` (also ``torchrun ... -m fastglow train ...``)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
