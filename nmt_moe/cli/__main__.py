"""`python -m nmt_moe.cli ...`: the same as the installed `nmt-moe ...`."""

import sys

from nmt_moe.cli import main

sys.exit(main())
