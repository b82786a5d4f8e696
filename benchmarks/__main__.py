"""``python -m benchmarks [--quick] [--out DIR]`` (from the repository root): see ``run.py``."""

import sys

from benchmarks.run import main

sys.exit(main())
