"""`python -m nm_optim ...` is `nm-optim ...`."""

import sys

from nm_optim.app.cli import main

if __name__ == "__main__":
    sys.exit(main())
