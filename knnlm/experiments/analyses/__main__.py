"""`python -m knnlm.experiments.analyses` (make analyses)."""

import sys

from .cli import main

sys.exit(main())
