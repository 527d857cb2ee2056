"""``python -m sparge_calibrate`` (the same as the ``sparge-calibrate`` command)."""

import sys

from .cli import main

sys.exit(main())
