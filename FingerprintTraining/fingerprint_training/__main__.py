"""``python -m fingerprint_training``: the whole ``subject-fingerprint`` command line (also under
``torchrun --nproc_per_node=N -m fingerprint_training train ...``)."""

import sys

from .cli import main

sys.exit(main())
