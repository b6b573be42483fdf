"""``python3 -m vmm.svm [options] -- CMD...`` (same as ``vmm svm``)."""

import sys

from .cli import main

sys.exit(main())
