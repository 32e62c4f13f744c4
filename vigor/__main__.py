import sys

from vigor.cli import main

sys.exit(main())
