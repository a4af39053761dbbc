"""`python -m covidsearch` is the covidsearch command."""
import sys

from .cli import main

sys.exit(main())
