"""``python -m ensemble`` is ``python -m ensemble.build``."""
import sys

from ensemble.build import main

sys.exit(main())
