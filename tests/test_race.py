"""The fine-tune's arch race: which archs race (``race_candidates``), and the stop-and-go training it needs
(``train_archs(until=...)``). The race itself runs end to end in tests/test_convert.py (tiny budget) and is killed
and resumed there (slow)."""

from __future__ import annotations

import copy

import pytest
import torch

from s2d import checkpoint
from s2d.models.zoo import get_model
from s2d.pipeline.convert import race_candidates
from s2d.runs import Run
from s2d.training.supernet import SupernetConfig, train_archs
from s2d.transform.arch import MultiStageArch
from s2d.transform.supernet import SuperNet
from tests.test_prune import _synthetic


def _record(widths: list[float], reward: float, meets: bool = True, cascade: bool = True,
            exits: list[str] | None = None) -> dict:
    stages = [{"width": w, "exit": e} for w, e in zip(widths, exits or ["output"] * len(widths), strict=True)]
    if cascade:
        stages.append({"width": 1.0, "exit": "output", "recompute": True})
    return {"arch": {"stages": stages}, "reward": reward, "meets_target": meets}


def test_the_chosen_arch_races_the_next_best_archs_that_train():
    best = _record([0.5], 0.57)
    again = _record([0.5], 0.50)  # the same network (another encoding's record): raced once
    neighbour = _record([0.5], 0.56, exits=["layer3.0"])  # another first exit at the same width: raced
    deeper = _record([0.375, 0.75], 0.60)  # more stages: the structure the search chose stays
    recs = [_record([1.0, 1.0], 0.90, cascade=False),  # full width: fits only its heads, nothing to race
            _record([0.25], 0.80, meets=False),  # breaks the promise
            best, again, deeper, neighbour, _record([0.375], 0.55), _record([0.25], 0.51), _record([0.125], 0.45)]
    got = race_candidates(recs, best, 3)
    assert [r["arch"]["stages"][0]["width"] for r in got] == [0.5, 0.5, 0.375] and got[0] is best
    assert got[1] is neighbour and race_candidates(recs, best, 4)[3]["arch"]["stages"][0]["width"] == 0.25
    # the same first stage with other stages after it asks the same question: one of them races
    twins = [best, _record([0.5, 0.75], 0.56), _record([0.5, 0.875], 0.55), _record([0.25, 0.75], 0.5)]
    assert race_candidates(twins, twins[1], 3) == [twins[1], twins[3]]
    assert race_candidates(recs, best, 1) == [best]
    # budget mode promises a cost, not an accuracy: the nearest archs race whatever their accuracy
    assert [r["arch"]["stages"][0]["width"] for r in race_candidates(recs, best, 2, must_meet=False)] == [0.5, 0.25]
    # nothing races a full-width choice (its heads are fitted on the static weights) or the static fallback
    full = recs[0]
    assert race_candidates(recs, full, 3) == [full]
    fallback = {"arch": {"stages": [{"width": 1.0, "exit": "output"}]}, "fallback": True}
    assert race_candidates(recs, fallback, 3) == [fallback]


def test_training_stopped_part_way_goes_on_with_the_same_schedule(tmp_path):
    """``until`` stops after that many steps of the schedule and checkpoints there; a second call goes on to the
    end with the learning rates an uninterrupted run has (the race's winner is not trained on a restarted
    schedule)."""
    torch.manual_seed(0)
    start = SuperNet(get_model("resnet20", 10, 1), (1, 28, 28), 10)
    arch = MultiStageArch.from_dict({"stages": [{"width": 0.5, "exit": "output"}]})
    data, cfg = _synthetic(), SupernetConfig(steps=4, batch_size=16, checkpoint_every=4, lr=0.05)

    def train(name: str, until: int | None) -> SuperNet:
        net = copy.deepcopy(start) if name not in nets else nets[name]
        train_archs(net, copy.deepcopy(start.static).eval(), data, lambda rng: [arch], cfg, Run(tmp_path / name),
                    ckpt_name="ft.pt", tag="ft", progress=False, until=until)
        nets[name] = net
        return net

    nets: dict[str, SuperNet] = {}
    train("straight", None)
    train("stopped", 2)
    state = checkpoint.load(tmp_path / "stopped" / "checkpoints" / "ft.pt")
    assert state["step"] == 2 and state["steps"] == 4
    lr_at_stop = state["scheduler"]["_last_lr"][0]
    straight = checkpoint.load(tmp_path / "straight" / "checkpoints" / "ft.pt")
    assert 0 < lr_at_stop < cfg.lr and straight["step"] == 4
    moved = {k: v.clone() for k, v in nets["stopped"].state_dict().items()}
    assert train("stopped", 2) is nets["stopped"]  # already there: nothing trains
    assert all(torch.equal(moved[k], v) for k, v in nets["stopped"].state_dict().items())
    train("stopped", None)
    state = checkpoint.load(tmp_path / "stopped" / "checkpoints" / "ft.pt")
    assert state["step"] == 4
    assert state["scheduler"]["_last_lr"] == pytest.approx(straight["scheduler"]["_last_lr"], rel=1e-12)
    # and a fresh process resumes it from the checkpoint alone, weights included
    fresh = copy.deepcopy(start)
    train_archs(fresh, copy.deepcopy(start.static).eval(), data, lambda rng: [arch], cfg, Run(tmp_path / "stopped"),
                ckpt_name="ft.pt", tag="ft", progress=False)
    assert all(torch.equal(v, nets["stopped"].state_dict()[k]) for k, v in fresh.state_dict().items())
