import sys

from pefrl.cli import main

sys.exit(main())
