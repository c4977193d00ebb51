"""Plots of a conversion: accuracy against average MACs for every evaluated arch and the report's rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SEARCHER_COLOURS = {"ppo": "tab:blue", "ppo_guided": "tab:purple", "nsga2": "tab:orange", "evolution": "tab:red",
                    "random": "tab:gray", "seed": "tab:green"}


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_search_curves(curves: dict[str, list[list[float]]], path, title: str) -> None:
    """Best-so-far reward against real evaluations, one line per searcher (mean over seeds, min-max band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for algo, runs in curves.items():
        n = min(len(r) for r in runs)
        if n == 0:
            continue
        a = np.array([r[:n] for r in runs])
        x = np.arange(1, n + 1)
        colour = SEARCHER_COLOURS.get(algo)
        ax.plot(x, a.mean(0), color=colour, label=f"{algo} (mean of {len(runs)} seeds)")
        ax.fill_between(x, a.min(0), a.max(0), color=colour, alpha=0.2)
    ax.set_xlabel("real evaluations")
    ax.set_ylabel("best reward so far")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_pareto(records: list[dict[str, Any]], report: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for searcher, colour in SEARCHER_COLOURS.items():
        pts = [r for r in records if r.get("searcher") == searcher]
        if pts:
            ax.scatter([r["average_macs"] / 1e6 for r in pts], [r["accuracy"] * 100 for r in pts], s=12,
                       alpha=0.6, color=colour, label=f"{searcher} ({len(pts)} archs, search val subset)")
    s = report["static"]
    ax.scatter([s["macs"] / 1e6], [report["static_val_accuracy"] * 100], marker="*", s=160, color="black",
               label="static model")
    markers = {"depth_only (supernet)": "s", "width_only (supernet)": "^", "static (supernet)": "D",
               "searched (supernet)": "o", "searched + fine-tuned": "P"}
    for row in report["rows"]:
        ax.scatter([row["calib_average_macs"] / 1e6], [row["calib_accuracy"] * 100],
                   marker=markers.get(row["name"], "h"), s=70, edgecolor="black", label=row["name"])
    ax.axhline((report["static_val_accuracy"] - report["tolerance_points"] / 100) * 100, ls="--", lw=0.8,
               color="tab:red", label="tolerance")
    ax.set_xlabel("average MACs (M, fvcore)")
    ax.set_ylabel("validation accuracy (%)")
    accs = [r["accuracy"] * 100 for r in records] + [report["static_val_accuracy"] * 100]
    ax.set_ylim(max(min(accs), report["static_val_accuracy"] * 100 - 15), max(accs) + 0.5)
    ax.set_title(f"{report['model']} on {report['dataset']}: accuracy vs average MACs")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)


def plot_front(records: list[dict[str, Any]], front: dict[str, Any], path) -> None:
    """``front.png`` of ``s2d pick --list``: every scored arch, the Pareto front joined up and numbered as in the
    table, and the static model, on the same validation images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    static = front["static_val_accuracy"] * 100
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([r["mac_ratio"] for r in records], [r["accuracy"] * 100 for r in records], s=10, alpha=0.4,
               color="tab:gray", label=f"scored archs ({len(records)})")
    pts = front["front"]
    xs, ys = [r["mac_ratio"] for r in pts], [r["accuracy"] * 100 for r in pts]
    ax.step(xs, ys, where="post", color="tab:blue", lw=1)
    ax.scatter(xs, ys, s=24, color="tab:blue", label=f"Pareto front ({len(pts)})")
    for i, (x, y) in enumerate(zip(xs, ys, strict=True), 1):
        ax.annotate(str(i), (x, y), textcoords="offset points", xytext=(3, -9), fontsize=7)
    ax.scatter([1.0], [static], marker="*", s=160, color="black", label="static model")
    ax.set_xlabel("average MACs (fraction of the static model's)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(max(min([*ys, static]), static - 15) - 0.5, max([*ys, static]) + 0.5)
    ax.set_title(f"{front['model']} on {front['dataset']}: the front to pick from")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
