"""CLI commands of the search: ``s2d supernet``, ``s2d search`` and ``s2d convert``."""

from __future__ import annotations

import argparse
import json


def _config(args: argparse.Namespace):
    from s2d.cli import _check_device
    from s2d.convert import ConvertConfig

    return ConvertConfig(model=args.model, dataset=args.dataset, weights=args.weights, algo=args.algo,
                         budget=args.budget, tolerance=args.tolerance, objective=args.objective,
                         search_thresholds=args.search_thresholds, max_stages=args.max_stages, bn=args.bn,
                         seed=args.seed,
                         val_size=args.val_size, split_seed=args.split_seed, data_dir=args.data_dir,
                         device=_check_device(args.device))


def _run_dir(args: argparse.Namespace) -> str:
    return args.run_dir or f"runs/convert-{args.model.replace(':', '-')}-{args.dataset.replace(':', '-')}-{args.budget}"


def cmd_supernet(args: argparse.Namespace) -> int:
    from s2d.convert import Pipeline

    p = Pipeline(_config(args), _run_dir(args), progress=not args.quiet)
    p.supernet_phase()
    print(f"supernet trained: {p.run.checkpoints / 'supernet.pt'} (TensorBoard: {p.run.tensorboard})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from s2d.convert import Pipeline
    from s2d.errors import S2DError

    p = Pipeline(_config(args), _run_dir(args), progress=not args.quiet)
    if not (p.run.checkpoints / "supernet.pt").exists():
        raise S2DError(f"{p.run.root} has no trained supernet; run `s2d supernet` (same flags) or `s2d convert` first")
    summaries = p.search_phase([args.algo] + (["random"] if args.compare_random and args.algo != "random" else []))
    print(json.dumps(summaries, indent=2))
    print(f"best arch: {p.run.root / 'best_arch.json'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from s2d.convert import Pipeline

    p = Pipeline(_config(args), _run_dir(args), progress=not args.quiet)
    report = p.run_all()
    print((p.run.root / "report.md").read_text())
    d = report["dynamic"]
    print(f"dynamic network: {p.run.checkpoints / 'dynamic.pt'}; export it with "
          f"`s2d export --weights {p.run.checkpoints / 'dynamic.pt'} --dataset {args.dataset} --out DIR`")
    print(f"summary: test accuracy {d['test_accuracy'] * 100:.2f} % ({d['accuracy_delta_points']:+.2f} points), "
          f"{1 / d['mac_ratio']:.2f}x fewer average MACs, throughput x{d['throughput_ratio']:.2f} (batch 256)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from s2d.bench import check_targets, check_zoo, rank_correlation
    from s2d.convert import Pipeline

    if args.what in ("targets", "zoo"):
        res = check_targets(_run_dir(args)) if args.what == "targets" else check_zoo()
        for k, v in res.items():
            print(f"{k:<24}{v['value']:>8.3f}  target {v['target']:<8} {'met' if v['met'] else 'NOT met'}")
        return 0 if all(v["met"] for v in res.values()) else 1
    p = Pipeline(_config(args), _run_dir(args), progress=not args.quiet)
    res = rank_correlation(p, archs=args.archs, steps=args.steps, seed=args.seed, progress=not args.quiet)
    for r in res["rows"]:
        print(f"supernet {r['supernet_acc'] * 100:6.2f} %   fine-tuned alone {r['finetuned_acc'] * 100:6.2f} %   "
              f"{len(r['arch']['stages'])} stages")
    print(f"Kendall tau {res['kendall_tau']:.3f} (p={res['p_value']:.3f}) over {res['archs']} archs "
          f"(last stage only: {res['kendall_tau_last_stage']:.3f})")
    return 0


def add_commands(sub, add_model_args, add_data_args, add_runtime_args) -> None:
    from s2d.convert import BUDGETS
    from s2d.search.evaluator import OBJECTIVES
    from s2d.search.runner import ALGOS

    def common(p: argparse.ArgumentParser) -> None:
        add_model_args(p)
        add_data_args(p)
        add_runtime_args(p)
        p.add_argument("--algo", choices=ALGOS, default="ppo", help="searcher (default: MaskablePPO)")
        p.add_argument("--budget", choices=tuple(BUDGETS), default="small",
                       help="small: the ~15 min demo; full: the quality setting; tiny: smoke tests")
        p.add_argument("--tolerance", type=float, default=0.5,
                       help="accuracy points below the static model allowed on validation data")
        p.add_argument("--objective", choices=OBJECTIVES, default="tolerance")
        p.add_argument("--search-thresholds", action="store_true",
                       help="search exit thresholds with the arch (EDANAS) instead of calibrating them")
        p.add_argument("--max-stages", type=int, default=4)
        p.add_argument("--bn", choices=("batch", "frozen"), default="batch",
                       help="batch-norm statistics in supernet training: per arch (batch) or the static ones (frozen)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--run-dir", help="default runs/convert-MODEL-DATASET-BUDGET")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    p = sub.add_parser("convert", help="static CNN -> searched dynamic network (supernet, search, fine-tune, report)")
    common(p)
    p.set_defaults(func=cmd_convert)
    p = sub.add_parser("supernet", help="train the weight-sharing supernet of a model (resumable)")
    common(p)
    p.set_defaults(func=cmd_supernet)
    p = sub.add_parser("search", help="search archs on a trained supernet (resumable; archive.jsonl)")
    common(p)
    p.add_argument("--compare-random", action="store_true", help="also run random search at the same budget")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("bench", help="measured targets: `zoo` accuracy, `targets` of a conversion, supernet `rank`")
    p.add_argument("what", choices=("zoo", "targets", "rank"))
    common(p)
    p.add_argument("--archs", type=int, default=8, help="rank: archs to fine-tune separately")
    p.add_argument("--steps", type=int, default=150, help="rank: fine-tune steps per arch")
    p.set_defaults(func=cmd_bench)
