"""`python -m knnlm.sweeps`: the command of knnlm.offline.sweeps (console script `knnlm-sweeps`), under
the name it has always had."""

import sys

from .offline.sweeps import main

if __name__ == "__main__":
    sys.exit(main())
