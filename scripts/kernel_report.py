"""The kernel report without a GPU: ``python scripts/kernel_report.py [--check triton|cuda|all] [--all] [--json PATH]``.

The same as ``python -m treelora.kernels.report`` (treelora/kernels/report.py says what it prints and checks).
"""

from __future__ import annotations

import sys

from treelora.kernels.report import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
