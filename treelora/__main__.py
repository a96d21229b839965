import sys

from treelora.cli import main

sys.exit(main())
