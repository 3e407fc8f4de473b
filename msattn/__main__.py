"""``python -m msattn``: the command line of :mod:`msattn.cli`."""

import sys

from .cli import main

sys.exit(main())
