"""`python -m dogkit ...` runs the same command line as the `dogkit` console script."""
import sys

from dogkit.cli import main

sys.exit(main())
