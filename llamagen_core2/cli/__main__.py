"""`python -m llamagen_core2.cli ...` (also `torchrun ... -m llamagen_core2.cli ...`)."""
import sys

from .commands import main

sys.exit(main())
