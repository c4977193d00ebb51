"""``MultiStageArch``: JSON round trip and validation errors that name the stage and field."""

from __future__ import annotations

import json

import pytest

from s2d.errors import ArchError, S2DError
from s2d.models import get_model
from s2d.transform.arch import WIDTH_GRID, MultiStageArch, Stage, static_arch
from s2d.transform.graph import analyze, channels


@pytest.fixture(scope="module")
def graph():
    return analyze(get_model("resnet20", 10, 1), (1, 28, 28))


def arch(*stages, thresholds=None, exit_rule="max_softmax") -> MultiStageArch:
    d = {"stages": [{"width": w, "exit": e, "reuse": r} for w, e, r in stages], "exit_rule": exit_rule}
    if thresholds is not None:
        d["thresholds"] = thresholds
    return MultiStageArch.from_dict(d)


def test_json_round_trip(tmp_path, graph):
    a = arch((0.25, "layer1.2", True), (0.5, "layer2.2", [True, False, True]), (1.0, "output", False),
             thresholds=[0.9, 0.75], exit_rule="entropy")
    a.validate(graph)
    text = a.to_json()
    b = MultiStageArch.from_dict(json.loads(text))
    assert b == a and b.key() == a.key()
    assert b.stages[1].reuse == (True, False, True) and b.stages[2].reuse is False
    assert b.thresholds == (0.9, 0.75) and b.exit_rule == "entropy"
    path = tmp_path / "arch.json"
    path.write_text(text)
    assert MultiStageArch.load(path) == a
    # per-section flags resolve per section
    assert [b.stages[1].reuse_in(i) for i in range(3)] == [True, False, True]
    assert b.stages[2].reuse_in(1) is False
    # thresholds are not part of the network's identity
    assert a.with_thresholds([0.1, 0.2]).key() == a.key()
    assert a.with_thresholds([0.1, 0.2]).thresholds == (0.1, 0.2)
    assert arch((0.5, "layer1.2", True), (1.0, "output", True)).key() != a.key()


def test_defaults_and_static_arch(graph):
    a = MultiStageArch.from_dict({"stages": [{"width": 0.5, "exit": "layer1.0"}, {"width": 1, "exit": "output"}]})
    assert a.stages[0].reuse is True and a.exit_rule == "max_softmax" and a.thresholds == ()
    a.validate(graph)
    s = static_arch()
    assert s.stages == (Stage(1.0, "output", True),)
    s.validate(graph)


def test_channels_rule():
    assert WIDTH_GRID == (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    assert [channels(w, 16) for w in WIDTH_GRID] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert channels(0.125, 3) == 1  # at least one channel
    assert channels(1.0, 3) == 3 and channels(0.5, 3) == 2  # round half to even: 1.5 -> 2
    assert channels(0.125, 4) == 1  # 0.5 -> 0, lifted to 1


def _error(a: MultiStageArch, graph) -> str:
    with pytest.raises(ArchError) as err:
        a.validate(graph)
    assert isinstance(err.value, S2DError)
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("stages, thresholds, needles", [
    # non-monotone widths
    ([(0.5, "layer1.2", True), (0.25, "layer2.2", True), (1.0, "output", True)], None,
     ["stage 2", "width", "0.25", "0.5"]),
    # exits going backwards
    ([(0.25, "layer2.2", True), (0.5, "layer1.2", True), (1.0, "output", True)], None,
     ["stage 2", "exit", "'layer1.2'", "'layer2.2'"]),
    # unknown exit name (the valid ones are listed)
    ([(0.25, "layer4.0", True), (1.0, "output", True)], None, ["stage 1", "exit", "'layer4.0'", "layer3.1"]),
    # width off the grid
    ([(0.3, "layer1.2", True), (1.0, "output", True)], None, ["stage 1", "width", "0.3", "grid"]),
    # a narrower last stage
    ([(0.5, "layer1.2", True), (0.25, "output", True)], None, ["stage 2", "width", "0.25", "0.5"]),
    # last stage not at the output
    ([(0.25, "layer1.2", True), (1.0, "layer3.1", True)], None, ["stage 2", "last", "'output'", "'layer3.1'"]),
    # wrong reuse list length
    ([(0.25, "layer1.2", True), (1.0, "output", [True, False])], None, ["stage 2", "reuse", "2 flags", "3 sections"]),
    # a stage that repeats the previous one computes nothing
    ([(0.5, "layer1.2", True), (0.5, "layer1.2", True), (1.0, "output", True)], None, ["stage 2", "width", "exit"]),
    # thresholds count
    ([(0.25, "layer1.2", True), (0.5, "layer2.2", True), (1.0, "output", True)], [0.9], ["thresholds", "got 1"]),
])
def test_validation_errors_name_stage_and_field(graph, stages, thresholds, needles):
    msg = _error(arch(*stages, thresholds=thresholds), graph)
    for n in needles:
        assert n in msg, (n, msg)


def test_too_many_stages_and_unknown_rule(graph):
    five = [(0.125, "relu", True), (0.25, "layer1.0", True), (0.5, "layer1.1", True), (0.75, "layer2.0", True),
            (1.0, "output", True)]
    assert "5" in _error(arch(*five), graph)
    with pytest.raises(ArchError) as e:  # refused on load, before any model is built
        arch((0.25, "layer1.2", True), (1.0, "output", True), exit_rule="confidence")
    msg = str(e.value)
    assert "exit_rule" in msg and "'confidence'" in msg and "max_softmax" in msg


@pytest.mark.parametrize("rule", ["max_softmax", "entropy", "margin"])
@pytest.mark.parametrize("bad", [1.7, -0.1, float("nan")])
def test_thresholds_outside_the_rules_range_are_refused(rule, bad):
    with pytest.raises(ArchError) as e:
        arch((0.25, "layer1.2", True), (1.0, "output", True), exit_rule=rule, thresholds=[bad])
    msg = str(e.value)
    assert rule in msg and "[0, 1]" in msg and "\n" not in msg
    for ok in (0.0, 0.5, 1.0, 1.01):  # 1.01: calibration's "never exit"
        arch((0.25, "layer1.2", True), (1.0, "output", True), exit_rule=rule, thresholds=[ok])


@pytest.mark.parametrize("d, needles", [
    ({"stages": []}, ["stages"]),
    ({"stages": [{"width": 0.5}]}, ["stage 1", "exit"]),
    ({"stages": [{"width": 0.5, "exit": "relu"}, {"width": "wide", "exit": "output"}]}, ["stage 2", "width", "'wide'"]),
    ({"stages": [{"width": 0.5, "exit": "relu"}, {"width": 1, "exit": "output", "reuse": "yes"}]},
     ["stage 2", "reuse", "'yes'"]),
    ({"stages": [{"width": 0.5, "exit": "relu", "reuse": [True, 1]}, {"width": 1, "exit": "output"}]},
     ["stage 1", "reuse"]),
    ({"stages": [{"width": 1, "exit": "output"}], "thresholds": "0.9"}, ["thresholds"]),
])
def test_malformed_json_is_an_arch_error(d, needles):
    with pytest.raises(ArchError) as err:
        MultiStageArch.from_dict(d)
    for n in needles:
        assert n in str(err.value), (n, str(err.value))


def test_load_errors(tmp_path):
    with pytest.raises(S2DError, match="does not exist"):
        MultiStageArch.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ArchError, match="not valid JSON"):
        MultiStageArch.load(bad)


def test_the_space_contains_static_pruning(graph):
    """A last stage below width 1 is valid: one stage at width w is a uniformly pruned network, and
    exits may sit on top of it."""
    pruned = arch((0.5, "output", True)).validate(graph)
    assert pruned.final_width == 0.5 and not pruned.is_full_width
    arch((0.25, "layer2.2", True), (0.625, "output", True)).validate(graph)
    arch((0.5, "layer2.2", True), (0.5, "output", True)).validate(graph)  # same width, later exit
