"""``python -m subject_fingerprint``: the engine's commands (index, query, library, dedup).
The full command line, training included, is ``subject-fingerprint`` or
``python -m fingerprint_training``."""

import sys

from .cli import main

sys.exit(main())
