"""The canonical space: every network has one encoding, so no two evaluations score one network.

Checked against the networks themselves: every encoding of a small ResNet-20 space (reuse flags
free, as the space once had them) runs on random weights, and encodings whose stages compute the
same logits must share a canonical key, encodings that differ must not.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import random_resnet20_supernet

from s2d.search.space import Decision, SearchSpace
from s2d.transform.arch import MultiStageArch, Stage
from s2d.transform.graph import OUTPUT_EXIT


@pytest.fixture(scope="module")
def net():
    return random_resnet20_supernet(head_std=1.0)


def small_space(net, widths: tuple[float, ...] = (0.25, 0.5, 1.0)) -> SearchSpace:
    space = SearchSpace(net.graph, widths=widths, max_stages=3)
    space.exits = ["layer2.1", OUTPUT_EXIT]  # 3 widths: 695 encodings of 212 networks
    return space


def encodings(space: SearchSpace, free_reuse: bool) -> list[MultiStageArch]:
    """Every decision sequence's arch; ``free_reuse`` lets every non-recomputing reuse flag take both values."""
    out = []

    def walk(decisions: list[Decision], i: int, chosen: dict[tuple, int], n: int) -> None:
        if i == len(decisions):
            out.append(space.build(n, chosen))
            return
        d = decisions[i]
        valid = np.flatnonzero(space.options(d, chosen, n))
        if d.kind == "reuse" and free_reuse and not chosen.get(("recompute", d.stage), 0):
            valid = np.array([0, 1])
        for o in valid:
            walk(decisions, i + 1, {**chosen, space.key_of(d): int(o)}, n)

    for n in np.flatnonzero(space.options(Decision("stages", -1), {}, 0)):
        walk(space.decisions(int(n)), 0, {}, int(n))
    return out


@torch.no_grad()
def fingerprint(net, arch: MultiStageArch, x: torch.Tensor) -> tuple:
    return tuple(round(v, 4) for lg in net.forward_stages(x, arch) for v in lg.flatten().tolist())


@pytest.mark.parametrize("widths", [pytest.param((0.5, 1.0), id="2-widths"),
                                    pytest.param((0.25, 0.5, 1.0), id="3-widths", marks=pytest.mark.slow)])
def test_one_key_per_network_and_one_network_per_key(net, widths):
    space = small_space(net, widths)
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    free = encodings(space, free_reuse=True)
    keys_of_network: dict[tuple, set[str]] = defaultdict(set)
    networks_of_key: dict[str, set[tuple]] = defaultdict(set)
    for arch in free:
        key, fp = arch.canonical(net.graph).key(), fingerprint(net, arch, x)
        keys_of_network[fp].add(key)
        networks_of_key[key].add(fp)
    assert all(len(k) == 1 for k in keys_of_network.values())  # encodings of one network share a key
    assert all(len(n) == 1 for n in networks_of_key.values())  # a key is one network
    assert len(networks_of_key) < len(free)  # the free flags did encode networks twice

    masked = encodings(space, free_reuse=False)
    keys = [a.key() for a in masked]
    assert len(set(keys)) == len(masked) == len(networks_of_key) == space.size()
    assert all(a == a.canonical(net.graph) for a in masked)  # the masks build canonical archs only
    assert len(free) == space.size(canonical=False)


def test_a_meaningless_reuse_flag_is_dropped(net):
    g = net.graph
    # Stage 2 is no wider than stage 1 up to stage 1's exit: it only adds layers beyond it, where nothing is cached.
    arch = MultiStageArch((Stage(0.5, "layer1.1", True), Stage(0.5, OUTPUT_EXIT, (False, False, False))))
    assert arch.canonical(g).stages[1].reuse is True
    # Wider stage 2 after an exit in section 0: its flag there matters, later sections' flags do not.
    arch = MultiStageArch((Stage(0.5, "layer1.1", True), Stage(1.0, OUTPUT_EXIT, (False, False, False))))
    assert arch.canonical(g).stages[1].reuse == (False, True, True)
    # A cascade's last stage reads nothing, the first stage has nothing to read.
    arch = MultiStageArch((Stage(0.25, OUTPUT_EXIT, False), Stage(1.0, OUTPUT_EXIT, False, recompute=True)))
    assert [s.reuse for s in arch.canonical(g).stages] == [True, True]


def test_the_evaluator_scores_encodings_of_one_network_once(net, fmnist, tmp_path):
    from s2d.measure.cost import static_cost
    from s2d.search.archive import Archive
    from s2d.search.evaluator import ArchEvaluator

    ev = ArchEvaluator(net, fmnist.val.subset(100), fmnist.info, static_accuracy=0.1,
                       static_macs=static_cost(net.reference.module, fmnist.info).total_macs,
                       archive=Archive(tmp_path / "archive.jsonl"))
    a = MultiStageArch((Stage(0.5, "layer1.1", True), Stage(0.5, OUTPUT_EXIT, False)))
    b = MultiStageArch((Stage(0.5, "layer1.1", True), Stage(0.5, OUTPUT_EXIT, True)))
    first, second = ev.evaluate(a), ev.evaluate(b)
    assert not first.cached and second.cached and ev.evaluations == 1
    assert first.arch["stages"][1]["reuse"] is True  # the archive holds the canonical encoding
    assert len(Archive(tmp_path / "archive.jsonl")) == 1
