"""`python -m dnrt ...`: the `dnrt` command without its console script (e.g. from a folder on PYTHONPATH)."""
import sys

from dnrt.tool.cli import main

sys.exit(main())
