"""``python -m DiffusionSegLib`` runs the ``diffusionseg`` command line."""

import sys

from DiffusionSegLib.cli import main

sys.exit(main())
