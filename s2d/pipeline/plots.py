"""Plots of a conversion: accuracy against average MACs for every evaluated arch and the report's rows."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_pareto(records: list[dict[str, Any]], report: dict[str, Any], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for searcher, colour in (("ppo", "tab:blue"), ("random", "tab:gray"), ("seed", "tab:green")):
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
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
