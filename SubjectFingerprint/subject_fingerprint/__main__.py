"""``python -m subject_fingerprint``: the same command line as ``subject-fingerprint``."""

import sys

from .cli import main

sys.exit(main())
