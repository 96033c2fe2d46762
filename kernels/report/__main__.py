"""``python -m fastgpt.kernels.report``: the command line (present.main)."""

import sys

from .present import main

sys.exit(main())
