"""`python -m knnlm.subset`: the command of knnlm.store.subset (console script `knnlm-subset`), under
the name it has always had."""

import sys

from .store.subset import main

if __name__ == "__main__":
    sys.exit(main())
