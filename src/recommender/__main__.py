"""`python -m recommender` is the `recommender` command."""

import sys

from recommender.cli import main

sys.exit(main())
