import sys

from treelora.cli import main

sys.exit(main(prog="python -m treelora"))
