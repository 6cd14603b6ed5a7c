"""``python -m kvcache.bench`` (the same as ``python -m kvcache bench``)."""

import sys

from .cli import main

sys.exit(main())
