"""`python -m bit_core ...` is the `bit` command."""

import sys

from bit_core.cli import main

sys.exit(main())
