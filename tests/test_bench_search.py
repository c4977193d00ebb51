"""``s2d bench search``: every searcher over several seeds on one supernet, its figures, resuming, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from s2d.pipeline.bench_search import hypervolume
from s2d.pipeline.convert import ConvertConfig, Pipeline

REPO = Path(__file__).resolve().parent.parent


def s2d(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "s2d", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=900, stdin=subprocess.DEVNULL)


def test_hypervolume_hand_made():
    # static 90 %: reference (0.15, 1.0); (0.10, 0.5) dominates 0.05 x 0.5, (0.12, 0.25) adds 0.03 x 0.25
    log = [{"accuracy": 0.90, "mac_ratio": 0.5}, {"accuracy": 0.88, "mac_ratio": 0.25},
           {"accuracy": 0.80, "mac_ratio": 0.1},  # beyond the reference point: counts nothing
           {"accuracy": 0.89, "mac_ratio": 0.6}]  # dominated
    assert hypervolume(log, 0.90) == pytest.approx(0.05 * 0.5 + 0.03 * 0.25)
    assert hypervolume([], 0.9) == 0.0


ALGOS = ["ppo", "ppo_guided", "nsga2", "evolution", "random"]


@pytest.mark.parametrize("algos", [pytest.param(["ppo", "evolution"], id="2-searchers"),
                                   pytest.param(ALGOS, id="all", marks=pytest.mark.slow)])
def test_bench_search_end_to_end_and_resumed(tmp_path, tiny_run, quick_data, algos):
    cfg = ConvertConfig(weights=str(tiny_run["model_pt"]), budget="tiny", val_size=quick_data.val_size, tolerance=50)
    p = Pipeline(cfg, tmp_path, progress=False, data=quick_data)
    p.supernet_phase()
    p.search_phase(["random"])  # the conversion's own archive: the bench starts from it
    conversion = (tmp_path / "archive.jsonl").read_text()
    args = ["bench", "search", "--run-dir", str(tmp_path), "--seeds", "2", "--evaluations", "3", "--threads", "1",
            "--quiet", *(["--algos", ",".join(algos)] if algos != ALGOS else [])]
    r = s2d(*args)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "bench_search"
    res = json.loads((out / "search.json").read_text())
    assert list(res["searchers"]) == algos
    for algo, row in res["searchers"].items():
        assert [s["seed"] for s in row["seeds"]] == [0, 1]
        assert all(s["evaluations"] == 3 for s in row["seeds"])
        for seed in (0, 1):
            path = out / f"{algo}-seed{seed}" / f"search_{algo}.jsonl"
            log = [json.loads(x) for x in path.read_text().splitlines()]
            assert len(log) == 3 and max(x["reward"] for x in log) == row["seeds"][seed]["best_reward"]
        assert row["best_reward"]["mean"] == pytest.approx(sum(s["best_reward"] for s in row["seeds"]) / 2)
    keys = [json.loads(x)["key"] for x in (out / "archive.jsonl").read_text().splitlines()]
    inherited = [json.loads(x)["key"] for x in conversion.splitlines()]
    assert res["inherited_from_conversion"] == len(inherited) > 0 and keys[: len(inherited)] == inherited
    # shared archive: a network is scored once, and not at all when the conversion scored it
    assert res["evaluations_spent"] == len(set(keys)) - len(inherited) <= len(algos) * 2 * 3
    assert f"| {algos[-1]} |" in (out / "search.md").read_text() and (out / "search.png").stat().st_size > 10_000
    assert (tmp_path / "archive.jsonl").read_text() == conversion  # the conversion's archive is not touched

    again = s2d(*args)  # everything is archived: resumes to the same figures without scoring anything
    assert again.returncode == 0, again.stderr
    res2 = json.loads((out / "search.json").read_text())
    assert res2["evaluations_spent"] == 0 and res2["searchers"] == res["searchers"]


def test_bench_search_without_a_conversion_is_one_line(tmp_path):
    r = s2d("bench", "search", "--run-dir", str(tmp_path / "nothing"), "--quiet")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "config.yaml is missing" in r.stderr and "s2d convert" in r.stderr
