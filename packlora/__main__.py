import sys

from packlora.cli import main

sys.exit(main())
