import sys

from dmuser.cli import main

sys.exit(main())
