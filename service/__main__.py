"""`python -m service ...` is the `bit` command (engine and service commands)."""

import sys

from service.cli import main

sys.exit(main())
