"""``python -m influence`` runs the ``influence`` command (see :mod:`influence.cli`)."""

import sys

from .cli import main

sys.exit(main())
