import os
import sys
import traceback

from treelora.cli import main

if int(os.environ.get("WORLD_SIZE") or 1) <= 1:
    sys.exit(main(prog="python -m treelora"))

# One process of several (torchrun): end it without the interpreter's shutdown, during which torch's gloo threads can
# abort it (treelora.cl.distributed.end_worker_process says why).
from treelora.cl.distributed import end_worker_process  # noqa: E402

try:
    code = main(prog="python -m treelora")
except SystemExit:  # --help, or arguments argparse refused: no process group exists yet
    raise
except BaseException:
    traceback.print_exc()
    code = 1
end_worker_process(code)
