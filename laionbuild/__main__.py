import sys

from laionbuild.cli import main

sys.exit(main())
