"""``s2d eval``: accuracy, MACs and CPU speed of a model, and of a dynamic arch of it."""

from __future__ import annotations

import argparse
import json

from s2d.cli.args import (
    add_data_args,
    add_model_args,
    add_runtime_args,
    check_device,
    float_in,
    load_data_and_model,
    positive_int,
)


def cmd_eval(args: argparse.Namespace) -> int:
    from s2d.pipeline.evaluate import evaluate_dynamic, evaluate_static
    from s2d.pipeline.format import format_eval

    arch = None
    if args.arch:  # fail on a malformed arch file before the slow part
        from s2d.transform.arch import MultiStageArch

        arch = MultiStageArch.load(args.arch)
    device = check_device(args.device)
    data, model = load_data_and_model(args)
    result = evaluate_static(model, data, device=device, limit=args.limit, repeats=args.repeats)
    result.update(model=args.model, weights=str(args.weights), dataset=args.dataset)
    if arch is not None:
        result["dynamic"] = evaluate_dynamic(model, data, arch, result, device=device, limit=args.limit,
                                             repeats=args.repeats, tolerance=args.tolerance / 100)
    print(json.dumps(result, indent=2) if args.json else format_eval(result))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="test accuracy, MACs and CPU speed of a model (and of a dynamic arch)")
    add_model_args(p)
    add_data_args(p)
    add_runtime_args(p)
    p.add_argument("--arch", help="MultiStageArch JSON file: add the dynamic network's figures")
    p.add_argument("--tolerance", type=float_in(0, 100), default=0.5,
                   help="accuracy points below static allowed when calibrating thresholds the arch file lacks")
    p.add_argument("--limit", type=positive_int, help="evaluate on the first N test images only")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed repeats for latency")
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    p.set_defaults(func=cmd_eval)
