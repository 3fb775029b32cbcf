import sys

from var_rt.cli import main

sys.exit(main())
