"""The ``s2d`` command line: argument parsing and printing only, one module per command group.

Every user-fixable problem surfaces as one line on stderr and exit code 2; Ctrl-C says how
to resume. Handlers import heavy modules lazily so that ``s2d --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable

from s2d import distributed
from s2d.allocator import keep_freed_memory
from s2d.cli import bench, convert, evaluate, train, transform, zoo
from s2d.cli.args import set_threads
from s2d.errors import S2DError


def build_parser() -> argparse.ArgumentParser:
    from s2d import __version__

    parser = argparse.ArgumentParser(
        prog="s2d", description="Turn a pretrained static CNN into a dynamic multi-stage network.")
    parser.add_argument("--version", action="version", version=f"s2d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (train, zoo, evaluate, transform, convert, bench):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # fvcore calls torch.jit.script at import; torch 2.14 warns about it on stderr, which would
    # break the "one line on stderr" promise for every command that counts MACs.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        keep_freed_memory()
        set_threads(args)
        _join_ranks(args)
        return func(args)
    except S2DError as e:
        print(f"s2d: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s2d: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("S2D_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"s2d: internal error: {type(e).__name__}: {first} (set S2D_DEBUG=1 for the traceback "
              "and please report it)", file=sys.stderr)
        return 1
    finally:
        distributed.leave()


def _join_ranks(args: argparse.Namespace) -> None:
    """Under torchrun, join the other ranks (training commands only); ranks other than 0 print nothing."""
    world = distributed.from_environment()
    if not world.distributed:
        return
    if not getattr(args, "data_parallel", False):
        raise S2DError(f"s2d {args.command} runs in one process; launch it without torchrun (data-parallel "
                       "commands: train-base, supernet, convert)")
    world, args.device = distributed.init(args.device)
    if not world.is_main:
        args.quiet = True
        sys.stdout = open(os.devnull, "w")
