"""``python -m scalebio`` = the ``scalebio`` command (so launchers like torchrun can use ``-m``)."""

import sys

from scalebio.cli import main

sys.exit(main())
