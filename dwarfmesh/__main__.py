"""`python -m dwarfmesh` is the same as the `dwarfmesh` command."""

import sys

from dwarfmesh.ui.cli import main

sys.exit(main())
