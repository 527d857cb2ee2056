"""``python -m calibrate`` (from a checkout) / ``python -m sparge_calibrate`` (installed)."""

import sys

from .cli import main

sys.exit(main())
