"""``s2d bench``: quality and speed targets, measured (never timed unit tests)."""

from __future__ import annotations

import argparse
from pathlib import Path

from s2d.cli.args import check_device, positive_int
from s2d.cli.convert import common_args, config_from_args, run_dir_from_args


def parse_reductions(text: str) -> tuple[float, ...]:
    """``--ratios 2,3,4`` (times fewer MACs) as MAC ratios (1/2, 1/3, 1/4); bad input is one line."""
    import math

    from s2d.errors import S2DError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise S2DError(f"--ratios takes MAC reductions like 2,3,4 (times fewer MACs), got {text!r}") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 1)]
    if not values or bad:
        raise S2DError(f"--ratios takes MAC reductions > 1 like 2,3,4 (times fewer MACs), got {text!r}")
    if len(set(values)) != len(values):
        raise S2DError(f"--ratios {text!r} repeats a reduction; give each once")
    return tuple(1 / v for v in values)


def cmd_peers(args: argparse.Namespace) -> int:
    import math

    from s2d.errors import S2DError
    from s2d.pipeline.peers import run_peers

    ratios = parse_reductions(args.ratios) if args.ratios.strip().lower() != "none" else ()
    seconds = None
    if args.peer_seconds is not None:
        try:
            seconds = float(args.peer_seconds)
        except ValueError:
            seconds = float("nan")
        if not (math.isfinite(seconds) and seconds > 0):
            raise S2DError(f"--peer-seconds must be a number of seconds > 0, got {args.peer_seconds!r}")
    res = run_peers(run_dir_from_args(args), ratios=ratios, seconds=seconds, device=check_device(args.device),
                    rounds=args.rounds, progress=not args.quiet, log=print)
    out = f"{res['run_dir']}/peers"
    print()
    print((Path(out) / "peers.md").read_text())
    print(f"written: {out}/peers.md, {out}/peers.json, {out}/peers.png")
    return 0


def cmd_search_bench(args: argparse.Namespace) -> int:
    from s2d.pipeline.bench_search import run_search_bench
    from s2d.pipeline.convert import ConvertConfig, Pipeline

    root = run_dir_from_args(args)
    cfg = ConvertConfig.from_run(root)
    cfg.device = check_device(args.device)
    algos = tuple(a.strip() for a in args.algos.split(",") if a.strip())
    res = run_search_bench(Pipeline(cfg, root, progress=not args.quiet), algos=algos, seeds=args.seeds,
                           evaluations=args.evaluations, progress=not args.quiet)
    out = f"{res['run_dir']}/bench_search"
    print((Path(out) / "search.md").read_text())
    print(f"written: {out}/search.md, {out}/search.json, {out}/search.png")
    return 0


def cmd_latency_bench(args: argparse.Namespace) -> int:
    from s2d.pipeline.bench_latency import run_latency_bench
    from s2d.pipeline.convert import ConvertConfig, Pipeline

    root = run_dir_from_args(args)
    cfg = ConvertConfig.from_run(root)
    cfg.device = check_device(args.device)
    res = run_latency_bench(Pipeline(cfg, root, progress=not args.quiet), archs=args.archs or 20, seed=args.seed,
                            progress=not args.quiet)
    out = f"{res['run_dir']}/bench_latency"
    print((Path(out) / "latency.md").read_text())
    print(f"written: {out}/latency.md, {out}/latency.json")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "peers":
        return cmd_peers(args)
    if args.what == "search":
        return cmd_search_bench(args)
    if args.what == "latency":
        return cmd_latency_bench(args)
    from s2d.pipeline.bench import check_targets, check_zoo, rank_correlation
    from s2d.pipeline.convert import Pipeline

    if args.what in ("targets", "zoo"):
        res = check_targets(run_dir_from_args(args)) if args.what == "targets" else check_zoo()
        for k, v in res.items():
            print(f"{k:<24}{v['value']:>8.3f}  target {v['target']:<8} {'met' if v['met'] else 'NOT met'}")
        return 0 if all(v["met"] for v in res.values()) else 1
    p = Pipeline(config_from_args(args), run_dir_from_args(args), progress=not args.quiet)
    res = rank_correlation(p, archs=args.archs or 8, steps=args.steps, seed=args.seed, progress=not args.quiet)
    for r in res["rows"]:
        print(f"supernet {r['supernet_acc'] * 100:6.2f} %   fine-tuned alone {r['finetuned_acc'] * 100:6.2f} %   "
              f"{len(r['arch']['stages'])} stages")
    print(f"Kendall tau {res['kendall_tau']:.3f} (p={res['p_value']:.3f}) over {res['archs']} archs "
          f"(last stage only: {res['kendall_tau_last_stage']:.3f})")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measured targets: `zoo` accuracy, `targets` of a conversion, supernet `rank`, "
                                     "`peers` (Torch-Pruning, depth-only, s2d on one wall clock), "
                                     "`search` (PPO vs NSGA-II vs random on a conversion's supernet), "
                                     "`latency` (the latency table against measured time)")
    p.add_argument("what", choices=("zoo", "targets", "rank", "peers", "search", "latency"))
    common_args(p)
    p.add_argument("--archs", type=positive_int, default=None,
                   help="rank: archs to fine-tune separately (default 8); latency: archive archs to time (default 20)")
    p.add_argument("--steps", type=positive_int, default=150, help="rank: fine-tune steps per arch")
    p.add_argument("--peer-seconds", metavar="S",
                   help="peers: KD fine-tune seconds of each Torch-Pruning peer (default: as long as the conversion "
                        "took, from state.json's phase seconds, else the run directory's file times)")
    p.add_argument("--ratios", default="2,3,4",
                   help="peers: Torch-Pruning MAC reductions, comma-separated (default 2,3,4; 'none': no peers)")
    p.add_argument("--algos", default="ppo,ppo_guided,nsga2,evolution,random",
                   help="search: searchers to compare, comma-separated")
    p.add_argument("--seeds", type=positive_int, default=3, help="search: seeds per searcher")
    p.add_argument("--rounds", type=positive_int, default=5,
                   help="peers: timing rounds; every network of the table is timed once per round, on fresh copies, "
                        "and shows the median over rounds with its range (default 5)")
    p.add_argument("--evaluations", type=positive_int, default=None,
                   help="search: real evaluations per searcher and seed (default: the conversion budget's)")
    p.set_defaults(func=cmd_bench)
