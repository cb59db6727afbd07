"""`python -m fedgrid <command>`: the same as the `fedgrid` command."""

import sys

from fedgrid.cli import main

sys.exit(main())
