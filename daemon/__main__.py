"""``python -m certwarden``."""

from __future__ import annotations

import sys

from certwarden.cli import main

sys.exit(main())
