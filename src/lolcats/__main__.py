"""python -m lolcats ..."""
import sys

from lolcats.cli import main

sys.exit(main())
