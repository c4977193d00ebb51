"""``s2d bench search``: do the searchers earn their place? PPO, NSGA-II and random search at equal real
evaluations, several seeds each, on one trained supernet.

Every (searcher, seed) is an ordinary resumable search in ``R/bench_search/<algo>-seed<K>/`` (its log,
its TensorBoard scalars, PPO's agent); they share one evaluator and one archive
(``R/bench_search/archive.jsonl``, apart from the conversion's, whose records choose the shipped arch),
so a network two searchers find is scored once and scores alike. The bench archive starts as a copy of
the conversion's (same supernet, same validation images, same objective: the same scores), so what the
conversion already scored costs nothing; the searchers are not handed the conversion's seed archs, though
(a searcher's log lists only what it asked for): this measures the searchers, not the seeds.

Figures per searcher, mean ± std over seeds: the best reward, the fewest average MACs among archs that
keep the tolerance on validation data, and the hypervolume of the (validation error, MAC ratio) front,
with reference point (static error + ``HV_MARGIN``, 1): the area of the cost/accuracy plane a user could
pick from that is no worse than 5 points below the static model and no costlier than it. And how well a
reward predictor fitted on a searcher's evaluations ranks archs it was not fitted on (Kendall tau, 5-fold).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from s2d.errors import S2DError
from s2d.runs import Run, write_json_atomic, write_text_atomic
from s2d.search.archive import Archive
from s2d.search.runner import ALGOS, run_search
from s2d.search.session import predictor_tau, read_search_log

TAU_AT = 100  # the reward predictor's held-out Kendall tau is reported on a searcher's first 100 evaluations
HV_MARGIN = 0.05  # accuracy (fraction) below the static model at which the hypervolume's reference point sits


def hypervolume(log: list[dict[str, Any]], static_accuracy: float) -> float:
    """Area dominated by the archs' (1 - accuracy, MAC ratio) points up to the reference point."""
    from pymoo.indicators.hv import HV

    ref = np.array([1 - static_accuracy + HV_MARGIN, 1.0])
    points = np.array([(1 - r["accuracy"], r["mac_ratio"]) for r in log], dtype=float).reshape(-1, 2)
    points = points[(points < ref).all(1)]
    return float(HV(ref_point=ref)(points)) if len(points) else 0.0


def _stats(values: list[float | None]) -> dict[str, Any]:
    got = [v for v in values if v is not None]
    a = np.asarray(got, dtype=float)
    return {"mean": float(a.mean()) if len(a) else None, "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
            "n": len(got), "values": values}


def run_search_bench(pipeline, *, algos: tuple[str, ...] = ALGOS, seeds: int = 3, evaluations: int | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every searcher over ``seeds`` seeds at ``evaluations`` real evaluations each (default:
    the conversion budget's) and write ``R/bench_search/search.{json,md,png}``."""
    from s2d.pipeline.plots import plot_search_curves

    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise S2DError(f"--algos takes searchers from {', '.join(ALGOS)}, got {','.join(algos) or 'none'}")
    if seeds < 1:
        raise S2DError(f"--seeds must be at least 1, got {seeds}")
    if not (pipeline.run.checkpoints / "supernet.pt").exists():
        raise S2DError(f"{pipeline.run.root} has no trained supernet (checkpoints/supernet.pt); run s2d convert "
                       f"(or s2d supernet) --run-dir {pipeline.run.root} first")
    budget = evaluations or pipeline.budget.evaluations
    pipeline.load_supernet()
    out = pipeline.run.root / "bench_search"
    ev = pipeline.evaluator(pipeline.budget.search_val_images)
    ev.archive = Archive(out / "archive.jsonl")
    if not len(ev.archive):  # the conversion's evaluator scored these the same way: they cost nothing here
        for rec in pipeline.archive.records():
            ev.archive.add(rec["key"], {k: v for k, v in rec.items() if k != "key"})
    inherited = len(pipeline.archive)
    static_acc = ev.static_accuracy
    rows, curves = {}, {}
    for algo in algos:
        per_seed = []
        for seed in range(seeds):
            run = Run(out / f"{algo}-seed{seed}")
            run_search(ev, pipeline.space, run, algo=algo, budget=budget, seed=seed, progress=progress)
            log = read_search_log(run.root / f"search_{algo}.jsonl")[:budget]
            feasible = [r["mac_ratio"] for r in log if r["meets_target"]]
            per_seed.append({"seed": seed, "best_reward": max(r["reward"] for r in log),
                             "best_mac_ratio_within_tolerance": min(feasible) if feasible else None,
                             "hypervolume": hypervolume(log, static_acc), "evaluations": len(log),
                             "predictor_tau": predictor_tau(pipeline.space, log[:TAU_AT]),
                             "best_so_far": [r["best_reward"] for r in log]})
        curves[algo] = [s.pop("best_so_far") for s in per_seed]
        rows[algo] = {"seeds": per_seed, **{k: _stats([s[k] for s in per_seed]) for k in
                                            ("best_reward", "best_mac_ratio_within_tolerance", "hypervolume",
                                             "predictor_tau")}}
    res = {"run_dir": str(pipeline.run.root), "model": pipeline.cfg.model, "evaluations": budget, "seeds": seeds,
           "tolerance_points": pipeline.cfg.tolerance, "static_val_accuracy": static_acc,
           "hypervolume_reference": [1 - static_acc + HV_MARGIN, 1.0], "searchers": rows,
           "evaluations_spent": ev.evaluations, "inherited_from_conversion": inherited}
    write_json_atomic(out / "search.json", res)
    write_text_atomic(out / "search.md", search_markdown(res))
    plot_search_curves(curves, out / "search.png",
                       f"{pipeline.cfg.model}: best reward vs real evaluations ({seeds} seeds)")
    return res


def _pm(s: dict[str, Any], fmt: str) -> str:
    if s["mean"] is None:
        return "none"
    partial = f" ({s['n']} of {len(s['values'])} seeds)" if s["n"] < len(s["values"]) else ""
    return f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])}{partial}"


def search_markdown(res: dict[str, Any]) -> str:
    lines = [f"# Searchers at {res['evaluations']} real evaluations, {res['seeds']} seeds: {res['model']}", "",
             "| searcher | best reward | fewest MACs within tolerance (ratio) | front hypervolume "
             f"| predictor tau (first {TAU_AT}, held out) |",
             "|---|---|---|---|---|"]
    for algo, r in res["searchers"].items():
        lines.append(f"| {algo} | {_pm(r['best_reward'], '{:.4f}')} | "
                     f"{_pm(r['best_mac_ratio_within_tolerance'], '{:.3f}')} | {_pm(r['hypervolume'], '{:.5f}')} | "
                     f"{_pm(r['predictor_tau'], '{:.2f}')} |")
    rnd = res["searchers"].get("random", {}).get("best_mac_ratio_within_tolerance", {}).get("mean")
    if rnd:
        lines += ["", "Average MACs within tolerance against random search's (lower is better):"]
        for algo, r in res["searchers"].items():
            m = r["best_mac_ratio_within_tolerance"]["mean"]
            if algo != "random" and m is not None:
                lines.append(f"- {algo}: {(m / rnd - 1) * 100:+.1f} %")
    lines += ["", f"Mean ± std over seeds; tolerance {res['tolerance_points']} points on the search's validation "
              f"images; hypervolume of (validation error, MAC ratio) up to {res['hypervolume_reference']}. "
              f"Real evaluations spent by this bench: {res['evaluations_spent']} (the rest came from its archive, "
              f"which started with the conversion's {res.get('inherited_from_conversion', 0)})."]
    return "\n".join(lines) + "\n"
