"""``python -m potion …``: the same command line as the ``potion`` script, for places where
only an interpreter is known (a Ray job's entrypoint, a venv that is not activated)."""
import sys

from potion.cli import main

sys.exit(main())
