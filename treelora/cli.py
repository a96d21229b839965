"""Command line: ``python -m treelora <command>`` (also installed as ``treelora``).

Commands: ``info`` (versions, devices, extension, backends per op) and ``demo`` (a small tour of the ops).
Errors in the arguments exit with code 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence


def _cmd_info(args: argparse.Namespace) -> int:
    from treelora import info

    return info.main(as_json=args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    from treelora import demo

    return demo.main(seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="treelora", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    p = sub.add_parser("info", help="versions, devices, the CUDA extension and the backends of each op")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)
    p = sub.add_parser("demo", help="run each op once on small CPU tensors and check it against its reference")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
