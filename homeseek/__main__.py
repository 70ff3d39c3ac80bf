"""python -m homeseek"""

import sys

from homeseek.cli import main

sys.exit(main())
