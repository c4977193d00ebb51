"""``s2d convert`` and its first phases on their own: ``s2d supernet``, ``s2d search``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from s2d import distributed
from s2d.cli.args import add_data_args, add_model_args, add_runtime_args, check_device, float_in, positive_int


def config_from_args(args: argparse.Namespace):
    from s2d.pipeline.convert import ConvertConfig

    return ConvertConfig(model=args.model, dataset=args.dataset, weights=args.weights, algo=args.algo,
                         budget=args.budget, tolerance=args.tolerance, objective=args.objective, cost=args.cost,
                         search_thresholds=args.search_thresholds, section_widths=args.section_widths,
                         exit_gates=args.exit_gates, exit_head=args.exit_head,
                         max_stages=args.max_stages, bn=args.bn,
                         importance=args.importance, target_mac_ratio=args.target_mac_ratio,
                         target_macs=args.target_macs, target_latency_ms=args.target_latency_ms,
                         confidence=args.confidence, calib_size=args.calib_size, seed=args.seed,
                         val_size=args.val_size, split_seed=args.split_seed, data_dir=args.data_dir,
                         device=check_device(args.device), workers=args.workers, ray_address=args.ray_address)


def run_dir_from_args(args: argparse.Namespace) -> str:
    return args.run_dir or f"runs/convert-{args.model.replace(':', '-')}-{args.dataset.replace(':', '-')}-{args.budget}"


def cmd_supernet(args: argparse.Namespace) -> int:
    from s2d.pipeline.convert import Pipeline

    p = Pipeline(config_from_args(args), run_dir_from_args(args), progress=not args.quiet)
    p.supernet_phase()
    print(f"supernet trained: {p.run.checkpoints / 'supernet.pt'} (TensorBoard: {p.run.tensorboard})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from s2d.errors import S2DError
    from s2d.pipeline.convert import Pipeline

    p = Pipeline(config_from_args(args), run_dir_from_args(args), progress=not args.quiet)
    if not (p.run.checkpoints / "supernet.pt").exists():
        raise S2DError(f"{p.run.root} has no trained supernet; run `s2d supernet` (same flags) or `s2d convert` first")
    summaries = p.search_phase([args.algo] + (["random"] if args.compare_random and args.algo != "random" else []))
    print(json.dumps(summaries, indent=2))
    print(f"best arch: {p.run.root / 'best_arch.json'}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from s2d.pipeline.convert import Pipeline

    if args.seeds > 1:
        return _convert_seeds(args)
    p = Pipeline(config_from_args(args), run_dir_from_args(args), progress=not args.quiet)
    print_report(p.run.root, p.run_all(), args.dataset)
    return 0


def print_report(root: Path, report: dict[str, Any], dataset: str) -> None:
    """A finished conversion's (or pick's) report, its fallback notice on stderr, and how to export it."""
    print((root / "report.md").read_text())
    if report.get("fallback") and distributed.current().is_main:  # one notice, not one per rank
        print(f"s2d: {report['fallback']}", file=sys.stderr)
    d = report["dynamic"]
    print(f"dynamic network: {root / 'checkpoints' / 'dynamic.pt'}; export it with "
          f"`s2d export --weights {root / 'checkpoints' / 'dynamic.pt'} --dataset {dataset} --out DIR`")
    print(f"summary: test accuracy {d['test_accuracy'] * 100:.2f} % ({d['accuracy_delta_points']:+.2f} points), "
          f"{1 / d['mac_ratio']:.2f}x fewer average MACs, throughput x{d['throughput_ratio']:.2f} (batch 256)")


def cmd_pick(args: argparse.Namespace) -> int:
    from s2d.errors import S2DError
    from s2d.pipeline.pick import list_front, pick

    choice = args.max_drop is not None or args.target_mac_ratio is not None
    if args.list and choice:
        raise S2DError("--list only shows the front; drop it to pick with --max-drop or --target-mac-ratio")
    if not choice:
        if args.out:
            raise S2DError("--out names the pick's run directory; give --max-drop or --target-mac-ratio with it")
        front = list_front(args.run_dir, device=check_device(args.device))
        print((Path(front["run_dir"]) / "front.md").read_text())
        print(f"written: {front['run_dir']}/front.md, front.json, front.png")
        return 0
    root, report = pick(args.run_dir, max_drop=args.max_drop, target_mac_ratio=args.target_mac_ratio, out=args.out,
                        device=check_device(args.device), progress=not args.quiet)
    print_report(root, report, report["dataset"])
    print(f"picked run: {root}")
    return 0


def _convert_seeds(args: argparse.Namespace) -> int:
    """``--seeds N``: conversions with seeds ``--seed`` .. ``--seed + N - 1`` in ``RUN_DIR/seed-K``, then the
    error bars (``RUN_DIR/seeds.md``). Each seed resumes on its own."""
    from s2d.errors import RunDirError
    from s2d.pipeline.convert import Pipeline
    from s2d.pipeline.seeds import write_seeds

    root = Path(run_dir_from_args(args))
    if (root / "config.yaml").exists():
        raise RunDirError(f"{root} holds a single conversion; pass a new --run-dir for --seeds")
    reports = {}
    for seed in range(args.seed, args.seed + args.seeds):
        cfg = config_from_args(args)
        cfg.seed = seed
        if not args.quiet:
            print(f"seed {seed}: {root / f'seed-{seed}'}", file=sys.stderr)
        reports[seed] = Pipeline(cfg, root / f"seed-{seed}", progress=not args.quiet).run_all()
        if reports[seed].get("fallback"):
            print(f"s2d: seed {seed}: {reports[seed]['fallback']}", file=sys.stderr)
    write_seeds(root, reports, args.model, args.dataset, args.budget)
    print((root / "seeds.md").read_text())
    return 0


def common_args(p: argparse.ArgumentParser) -> None:
    """The flags of a conversion (its identity in the run directory), shared with ``s2d bench``."""
    from s2d.measure.latency import COSTS
    from s2d.pipeline.convert import BUDGETS
    from s2d.search.evaluator import OBJECTIVES
    from s2d.search.runner import ALGOS
    from s2d.transform.importance import CRITERIA
    from s2d.transform.sliced import EXIT_HEADS

    add_model_args(p)
    add_data_args(p)
    add_runtime_args(p)
    p.add_argument("--algo", choices=ALGOS, default="ppo", help="searcher (default: MaskablePPO)")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="small",
                   help="small: the ~15 min demo; full: the quality setting; tiny: smoke tests")
    p.add_argument("--tolerance", type=float_in(0, 100), default=0.5,
                   help="accuracy points below the static model allowed on validation data")
    p.add_argument("--objective", choices=OBJECTIVES, default="tolerance")
    p.add_argument("--cost", choices=COSTS, default="macs",
                   help="what the search minimises: fvcore MACs, batch-1 latency or batch-256 time per image on this "
                        "machine, predicted from a table of measured stage times (s2d bench latency checks it)")
    p.add_argument("--target-mac-ratio", type=float_in(0, 1, lo_open=True),
                   help="budget mode: at most this fraction of the static MACs on average (e.g. 0.25 for 4x fewer), "
                        "the most accurate network within it")
    p.add_argument("--target-macs", type=float_in(0, float("inf"), lo_open=True, hi_open=True),
                   help="budget mode in absolute MACs (fvcore's unit), e.g. 8e6: the most accurate network with at "
                        "most that many MACs per image on average")
    p.add_argument("--target-latency-ms", type=float_in(0, float("inf"), lo_open=True, hi_open=True),
                   help="budget mode in batch-1 milliseconds on this machine: the most accurate network whose "
                        "average latency stays within it (searched in latency predicted from measured stage times)")
    p.add_argument("--confidence", type=float_in(0.5, 1, hi_open=True), default=0.9,
                   help="confidence of the tolerance: the shipped thresholds keep an upper bound of the accuracy drop "
                        "within it on the held-out calibration split (default 0.9)")
    p.add_argument("--calib-size", type=positive_int,
                   help="held-out images kept for certifying the chosen network's thresholds, never seen by the "
                        "search or the fine-tune (default: half of --val-size)")
    p.add_argument("--search-thresholds", action="store_true",
                   help="search exit thresholds with the arch (EDANAS) instead of calibrating them")
    p.add_argument("--section-widths", action="store_true",
                   help="let each stage taper its width over the sections (narrower where activations are large, "
                        "wider where they are small: non-uniform pruning that runs faster per MAC on a CPU)")
    p.add_argument("--exit-gates", action="store_true",
                   help="let a logistic gate per exit, fitted on the search's validation images to the images an exit "
                        "would lose, decide who leaves instead of the exit rule's softmax (see README: Exit gates)")
    p.add_argument("--exit-head", choices=tuple(EXIT_HEADS), default="mlp",
                   help="exit heads of full-width stages, fitted on the static network's frozen features: a hidden "
                        "layer of 256 units before the classifier (mlp, default) or a linear probe (linear)")
    p.add_argument("--max-stages", type=int, choices=(2, 3, 4), default=4)
    p.add_argument("--bn", choices=("batch", "frozen"), default="batch",
                   help="batch-norm statistics in supernet training: per arch (batch) or the static ones (frozen)")
    p.add_argument("--importance", choices=(*CRITERIA, "none"), default="l2",
                   help="order every coupled channel group by this Torch-Pruning criterion before the supernet is "
                        "built, so narrow stages keep the channels a pruner would keep (default: l2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=positive_int, default=1,
                   help="Ray workers that score the search's candidates in parallel, each holding the supernet "
                        "(needs the distributed extra; PPO proposes one arch at a time and gains nothing)")
    p.add_argument("--ray-address", help="an existing Ray cluster for --workers (default: start one here)")
    p.add_argument("--run-dir", help="default runs/convert-MODEL-DATASET-BUDGET")
    p.add_argument("--quiet", action="store_true", help="no progress bars")



def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="static CNN -> searched dynamic network (supernet, search, fine-tune, report)")
    common_args(p)
    p.add_argument("--seeds", type=positive_int, default=1,
                   help="repeat the conversion with this many seeds (RUN_DIR/seed-K) and report mean ± std "
                        "(RUN_DIR/seeds.md)")
    p.set_defaults(func=cmd_convert, data_parallel=True)
    p = sub.add_parser("supernet", help="train the weight-sharing supernet of a model (resumable)")
    common_args(p)
    p.set_defaults(func=cmd_supernet, data_parallel=True)
    p = sub.add_parser("search", help="search archs on a trained supernet (resumable; archive.jsonl)")
    common_args(p)
    p.add_argument("--compare-random", action="store_true", help="also run random search at the same budget")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("pick", help="list a conversion's accuracy/MACs front, or ship another point of it (no new "
                                     "search: fine-tune and certified report as in convert)")
    p.add_argument("--run-dir", required=True, help="a finished s2d convert run directory (R)")
    p.add_argument("--max-drop", type=float, metavar="POINTS",
                   help="ship the cheapest point within POINTS accuracy points of the static model (certified)")
    p.add_argument("--target-mac-ratio", type=float, metavar="X",
                   help="budget mode: the most accurate point with at most X of the static MACs on average")
    p.add_argument("--list", action="store_true", help="print the front (also without a choice) and exit")
    p.add_argument("--out", help="the pick's run directory (default R/picks/drop-POINTS or R/picks/macs-X)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_runtime_args(p)
    p.set_defaults(func=cmd_pick)
