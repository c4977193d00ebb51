"""``s2d bench``: quality and speed targets, measured (never timed unit tests)."""

from __future__ import annotations

import argparse

from s2d.cli.args import positive_int
from s2d.cli.convert import common_args, config_from_args, run_dir_from_args


def cmd_bench(args: argparse.Namespace) -> int:
    from s2d.pipeline.bench import check_targets, check_zoo, rank_correlation
    from s2d.pipeline.convert import Pipeline

    if args.what in ("targets", "zoo"):
        res = check_targets(run_dir_from_args(args)) if args.what == "targets" else check_zoo()
        for k, v in res.items():
            print(f"{k:<24}{v['value']:>8.3f}  target {v['target']:<8} {'met' if v['met'] else 'NOT met'}")
        return 0 if all(v["met"] for v in res.values()) else 1
    p = Pipeline(config_from_args(args), run_dir_from_args(args), progress=not args.quiet)
    res = rank_correlation(p, archs=args.archs, steps=args.steps, seed=args.seed, progress=not args.quiet)
    for r in res["rows"]:
        print(f"supernet {r['supernet_acc'] * 100:6.2f} %   fine-tuned alone {r['finetuned_acc'] * 100:6.2f} %   "
              f"{len(r['arch']['stages'])} stages")
    print(f"Kendall tau {res['kendall_tau']:.3f} (p={res['p_value']:.3f}) over {res['archs']} archs "
          f"(last stage only: {res['kendall_tau_last_stage']:.3f})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measured targets: `zoo` accuracy, `targets` of a conversion, supernet `rank`")
    p.add_argument("what", choices=("zoo", "targets", "rank"))
    common_args(p)
    p.add_argument("--archs", type=positive_int, default=8, help="rank: archs to fine-tune separately")
    p.add_argument("--steps", type=positive_int, default=150, help="rank: fine-tune steps per arch")
    p.set_defaults(func=cmd_bench)
