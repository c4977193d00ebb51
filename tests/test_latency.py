"""The latency table: stage times measured once per stage prefix, kept per machine, composed with exit rates.

Speed figures themselves are checked by ``s2d bench latency``, not here: these tests check the bookkeeping
and the composition rule with the table's own numbers.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from s2d.measure.latency import LatencyTable, StageTime
from s2d.transform.arch import MultiStageArch, Stage
from tests.conftest import random_resnet20_supernet


@pytest.fixture(scope="module")
def supernet():
    return random_resnet20_supernet(head_std=1.0)


def _table(supernet, path=None, shared=None, reference=None) -> LatencyTable:
    reference = copy.deepcopy(supernet.static).eval() if reference is None else reference
    return LatencyTable(supernet, reference, path=path, shared=shared, batch=8, repeats=2, b1_repeats=3)


TWO = MultiStageArch((Stage(0.25, "layer2.0"), Stage(1.0, "output")))
THREE = MultiStageArch((Stage(0.25, "layer2.0"), Stage(0.5, "layer3.0"), Stage(1.0, "output")))


def test_stage_time_interpolates_between_the_measured_batches():
    t = StageTime(b1_ms=1.0, mid_ms=4.0, large_ms=9.0, mid=3, batch=5)
    assert t.at(0) == 0.0
    assert t.at(0.5) == pytest.approx(0.5)  # run half of the time, on one sample
    assert t.at(1) == pytest.approx(1.0)
    assert t.at(2) == pytest.approx(2.5)
    assert t.at(3) == pytest.approx(4.0)
    assert t.at(4) == pytest.approx(6.5)
    assert t.at(5) == pytest.approx(9.0)


def test_stages_are_measured_once_per_prefix_and_shared(supernet, tmp_path):
    table = _table(supernet, tmp_path / "t.json")
    first = table.stage_times(TWO)
    assert table.measured == 2 and all(t.b1_ms > 0 and t.large_ms > 0 for t in first)
    assert table.stage_times(TWO) == first and table.measured == 2  # looked up, not timed again
    table.stage_times(THREE)  # shares the first stage only (the second stage differs, the last follows others)
    assert table.measured == 4 and len(table) == 4
    assert table.stage_times(THREE)[0] == first[0]


def test_table_is_kept_for_this_machine_only(supernet, tmp_path):
    path = tmp_path / "t.json"
    table = _table(supernet, path)
    times = table.stage_times(TWO)
    again = _table(supernet, path)
    assert again.stage_times(TWO) == times and again.measured == 0 and again.static == table.static
    saved = json.loads(path.read_text())
    saved["machine"]["threads"] += 1  # measured with other threads: says nothing about this process
    path.write_text(json.dumps(saved))
    other = _table(supernet, path)
    other.stage_times(TWO)
    assert other.measured == 2
    saved = json.loads(path.read_text())
    saved["machine"].pop("layout")  # a table timed before deployed stages ran channels-last
    path.write_text(json.dumps(saved))
    older = _table(supernet, path)
    older.stage_times(TWO)
    assert older.measured == 2
    path.write_text("{not json")
    assert _table(supernet, path).stage_times(TWO) and len(json.loads(path.read_text())["stages"]) == 2


def test_another_run_takes_its_stage_times_from_the_machine_store(supernet, tmp_path):
    store = tmp_path / "store"
    first = _table(supernet, tmp_path / "a.json", store)
    times = first.stage_times(TWO)
    second = _table(supernet, tmp_path / "b.json", store)  # a second run of the same network: nothing timed
    assert (second.measured, second.reused, second.static) == (0, 2, first.static)
    assert second.stage_times(TWO) == times and second.measured == 0
    assert len(json.loads((tmp_path / "b.json").read_text())["stages"]) == 2  # the run keeps what it took
    second.stage_times(THREE)  # two new stages, stored for the runs after it
    assert second.measured == 2
    [kept] = store.iterdir()
    assert len(json.loads(kept.read_text())["stages"]) == 4


def test_store_times_join_a_run_table_as_multiples_of_its_static_time(supernet, tmp_path):
    store = tmp_path / "store"
    _table(supernet, None, store).stage_times(THREE)
    own = tmp_path / "own.json"
    _table(supernet, own).stage_times(TWO)  # a run table of its own, not in the store
    saved = json.loads(own.read_text())
    saved["static"] = {k: v * 2 if k.endswith("_ms") else v for k, v in saved["static"].items()}  # a slower hour
    own.write_text(json.dumps(saved))
    run = _table(supernet, own, store)
    assert run.reused == 2 and run.measured == 0  # THREE's 2nd and 3rd stages; its 1st is TWO's, kept as measured
    stored = json.loads(next(store.iterdir()).read_text())
    for key in (THREE.stage_key(1), THREE.stage_key(2)):
        for field in ("b1_ms", "mid_ms", "large_ms"):
            want = stored["stages"][key][field] / stored["static"][field] * saved["static"][field]
            assert getattr(run.entries[key], field) == pytest.approx(want)
    assert run.entries[TWO.stage_key(0)] == StageTime(**saved["stages"][TWO.stage_key(0)])


def test_a_run_table_timed_before_the_store_fills_it(supernet, tmp_path):
    own = tmp_path / "own.json"
    _table(supernet, own).stage_times(THREE)  # timed without a store
    store = tmp_path / "store"
    assert _table(supernet, own, store).reused == 0
    later = _table(supernet, None, store)
    assert later.reused == 3 and later.stage_times(THREE) and later.measured == 0


def test_store_is_kept_per_network_and_machine(supernet, tmp_path):
    store = tmp_path / "store"
    _table(supernet, None, store).stage_times(TWO)
    other = _table(supernet, None, store, reference=torch.nn.Sequential(copy.deepcopy(supernet.static).eval()))
    assert other.reused == 0 and other.network != _table(supernet).network  # another network's layers
    other.stage_times(TWO)
    assert other.measured == 2 and len(list(store.iterdir())) == 2
    wider = LatencyTable(supernet, copy.deepcopy(supernet.static).eval(), shared=store, batch=16, repeats=2,
                         b1_repeats=3)
    assert wider.reused == 0  # timed at another batch: another machine record, another file
    for f in store.iterdir():
        f.write_text("{not json")
    broken = _table(supernet, None, store)
    assert broken.reused == 0 and broken.stage_times(TWO) and broken.measured == 2
    assert len(json.loads(broken.shared.read_text())["stages"]) == 2  # rewritten whole


def test_prediction_composes_stage_times_with_exit_rates(supernet):
    table = _table(supernet)
    t = table.stage_times(THREE)
    assert table.predict_ms(THREE, [1.0, 0.0, 0.0]) == pytest.approx(t[0].b1_ms)
    expected = t[0].b1_ms + 0.5 * t[1].b1_ms + 0.2 * t[2].b1_ms  # reach 1, 0.5, 0.2
    assert table.predict_ms(THREE, [0.5, 0.3, 0.2]) == pytest.approx(expected)
    expected_large = t[0].large_ms + t[1].at(4) + t[2].at(1.6)
    assert table.predict_ms(THREE, [0.5, 0.3, 0.2], batch=8) == pytest.approx(expected_large)
    assert table.ratio(THREE, [0.5, 0.3, 0.2]) == pytest.approx(expected / table.static_ms(1))
    costs, static = table.stage_costs(THREE, "throughput")
    assert costs == pytest.approx([x.large_ms / 8 for x in t]) and static == pytest.approx(table.static.large_ms / 8)


def test_exit_decisions_that_skip_the_indexing_give_the_same_outputs(supernet):
    """``route``'s fast paths (nobody exits, everybody exits, one sample) against the general one."""
    arch = THREE
    net = supernet.materialise(arch)
    x = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    stages = net.forward_all(x)
    for thresholds in ([1.01, 1.01], [0.0, 0.0], [0.0, 1.01], [1.01, 0.0], [0.5, 0.6]):
        net.set_thresholds(thresholds)
        out, exits = net(x)
        conf = [arch.confidence(s, stages[s]) for s in range(2)]
        expect = torch.full((16,), 2)
        expect[conf[1] >= thresholds[1]] = 1
        expect[conf[0] >= thresholds[0]] = 0
        assert torch.equal(exits, expect)
        want = torch.stack([stages[int(e)][i] for i, e in enumerate(expect)])
        assert torch.allclose(out, want, atol=1e-5)
        one, one_exit = net(x[3:4])
        assert torch.allclose(one[0], want[3], atol=1e-5) and int(one_exit) == int(expect[3])
