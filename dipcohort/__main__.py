"""`python -m dipcohort ...` runs the command line."""
import sys

from dipcohort.cli import main

sys.exit(main())
