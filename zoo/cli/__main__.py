"""`python -m zoo.cli ...` runs the `kvzoo` command."""

import sys

from . import main

sys.exit(main())
