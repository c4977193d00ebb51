"""Cascade archs: a last stage that recomputes the static network from the image on its own copy of the weights
(frozen in supernet training, distilled on its own in the final fine-tune)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import random_resnet20_supernet

from s2d.data import Batches, DatasetInfo
from s2d.errors import ArchError
from s2d.measure.cost import stage_macs, static_cost
from s2d.models import get_model
from s2d.search.space import Decision, SearchSpace
from s2d.transform.arch import MultiStageArch
from s2d.transform.export import ExportedDynamicNet, export
from s2d.transform.supernet import SuperNet

SHAPE = (1, 28, 28)


def cascade(*narrow: tuple[float, str]) -> MultiStageArch:
    stages = [{"width": w, "exit": e} for w, e in narrow]
    return MultiStageArch.from_dict({"stages": [*stages, {"width": 1.0, "exit": "output", "recompute": True}]})


@pytest.fixture(scope="module")
def sn() -> SuperNet:
    return random_resnet20_supernet(head_std=2.0)


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(16, *SHAPE, generator=torch.Generator().manual_seed(0))


def test_json_round_trip_and_keys(sn):
    a = cascade((0.5, "output")).validate(sn.graph)
    assert a.is_cascade and a.trained_stages == 1 and not a.is_full_width
    d = json.loads(a.to_json())
    assert d["stages"][1]["recompute"] is True and "recompute" not in d["stages"][0]
    assert MultiStageArch.from_dict(d) == a
    # a reusing arch keeps the key it had before recompute existed (archives of old runs stay valid)
    reusing = MultiStageArch.from_dict({"stages": [{"width": 0.5, "exit": "output"}, {"width": 1.0, "exit": "output"}]})
    assert "recompute" not in reusing.key() and reusing.key() != a.key()
    assert not reusing.is_cascade and reusing.trained_stages == 2


@pytest.mark.parametrize("stages, needles", [
    ([(0.5, "output", True), (1.0, "output", False)], ["stage 1", "last stage"]),  # not the last stage
    ([(0.25, "layer1.2", False), (0.5, "output", True)], ["stage 2", "width 1"]),  # narrow
    ([(1.0, "layer1.2", False), (1.0, "output", True)], ["stage 2", "full-width stage 1", "reuse"]),  # redundant
    ([(1.0, "output", True)], ["stage 1", "two or more"]),  # alone it is the static model
])
def test_invalid_recompute_is_refused_by_stage(sn, stages, needles):
    a = MultiStageArch.from_dict({"stages": [{"width": w, "exit": e, "recompute": r} for w, e, r in stages]})
    with pytest.raises(ArchError) as err:
        a.validate(sn.graph)
    for n in needles:
        assert n in str(err.value), (n, str(err.value))
    with pytest.raises(ArchError, match="recompute must be true or false"):
        MultiStageArch.from_dict({"stages": [{"width": 1.0, "exit": "output", "recompute": "yes"}]})


@pytest.mark.parametrize("narrow", [[(0.5, "output")], [(0.25, "layer1.2"), (0.5, "layer2.2")]])
def test_last_stage_is_the_static_model_and_earlier_stages_are_unchanged(sn, x, narrow):
    a = cascade(*narrow).validate(sn.graph)
    reusing = MultiStageArch.from_dict({"stages": [*({"width": w, "exit": e} for w, e in narrow),
                                                   {"width": 1.0, "exit": "output"}]})
    with torch.no_grad():
        static = sn.static(x)
        outs = sn.forward_stages(x, a)
        ref = sn.forward_stages(x, reusing)
    torch.testing.assert_close(outs[-1], static, atol=1e-5, rtol=0)
    for got, want in zip(outs[:-1], ref[:-1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert sn.plan(a).cache_in[-1] == [] and sn.plan(a).cache_out[-2] == []  # reads nothing earlier stages made
    for fold_bn in (True, False):
        net = sn.materialise(a, fold_bn=fold_bn)
        for got, want in zip(net.forward_all(x), outs, strict=True):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)  # folding rounds large logits


def test_training_leaves_the_recomputed_static_network_untouched(fmnist, tmp_path):
    from s2d.runs import Run
    from s2d.training.supernet import SupernetConfig, train_archs

    model = get_model("resnet20", 10, 1).eval()
    sn = SuperNet(copy.deepcopy(model), SHAPE, 10)
    a = cascade((0.5, "output")).validate(sn.graph)
    before = {k: v.clone() for k, v in sn.reference.state_dict().items()}
    shared = sn.static.get_submodule("layer1.0.conv1").weight.clone()
    train_archs(sn, model, fmnist, lambda rng: [a], SupernetConfig(steps=3, batch_size=16, checkpoint_every=3),
                Run(tmp_path), ckpt_name="ft.pt", tag="ft", progress=False)
    after = sn.reference.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics alike
    assert not torch.equal(shared, sn.static.get_submodule("layer1.0.conv1").weight)  # stage 1 did train
    sn.train()
    assert not any(m.training for m in sn.reference.modules())
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(sn.forward_stages(x, a)[-1], model(x), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def finetuned_cascade(tmp_path_factory, tiny_run, quick_data):
    """Tiny conversion phases up to the fine-tune, with the search's choice forced to a cascade."""
    import s2d.pipeline.convert as convert

    arch = cascade((0.25, "output"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(convert, "choose_arch", lambda records, must_meet=True, images=None: {"arch": arch.to_dict()})
        mp.setattr(convert, "race_candidates", lambda records, best, k, must_meet=True: [best])  # no race either
        root = tmp_path_factory.mktemp("cascade") / "run"
        p = convert.Pipeline(convert.ConvertConfig(budget="tiny", weights=str(tiny_run["model_pt"]), tolerance=15),
                             root, progress=False, data=quick_data)
        p.supernet_phase()
        p.search_phase()
        p.finetune_phase()
    return {"root": root, "arch": arch}


def test_the_final_fine_tune_distils_the_cascades_static_stage(finetuned_cascade, quick_data):
    """The chosen cascade's last stage is trained too (from the static model, on its own copy): what the
    fine-tuned network runs there is the distilled copy, checkpointed apart so that a killed run resumes it."""
    import s2d.pipeline.convert as convert
    from s2d import checkpoint

    root, arch = finetuned_cascade["root"], finetuned_cascade["arch"]
    p = convert.Pipeline(convert.ConvertConfig.from_run(root), root, progress=False, data=quick_data)
    saved = checkpoint.load(root / "checkpoints" / "static_stage.pt")
    assert saved["step"] == convert.BUDGETS["tiny"].static_stage_steps == 2
    sn = p.load_finetuned()
    stage = sn.reference.module
    assert all(torch.equal(v, saved["state_dict"][k]) for k, v in stage.state_dict().items())
    ordered = p.ordered.state_dict()
    assert any(not torch.equal(v, ordered[k]) for k, v in stage.state_dict().items() if k.endswith("weight"))
    assert not any(prm.requires_grad for prm in stage.parameters()) and not stage.training  # frozen again
    x = next(iter(Batches(quick_data.test, quick_data.info, 8)))[0]
    with torch.no_grad():
        last = sn.eval().forward_stages(x, arch)[-1]
        torch.testing.assert_close(last, stage(x), atol=1e-5, rtol=0)  # the cascade runs the distilled copy
        assert (last - p.static.eval()(x)).abs().max() > 1e-3  # ... not the static model any more
        net = sn.materialise(arch.with_thresholds([1.01]))  # nobody exits early: every image runs the last stage
        torch.testing.assert_close(net(x)[0], last, atol=1e-4, rtol=1e-4)


def test_a_tolerance_the_distilled_copy_cannot_keep_ships_the_untouched_static_stage(finetuned_cascade, quick_data,
                                                                                     tmp_path, quick_timing):
    """Where the distilled copy disagrees with the static model too often to certify the tolerance, the cascade's
    twin ending in the untouched static network is certified instead (each at half the risk) and ships, with its
    own row and checkpoint, and the fine-tuned weights are left as they were."""
    import shutil

    import s2d.pipeline.convert as convert
    from s2d import checkpoint
    from s2d.pipeline.evaluate import dynamic_from_files

    root = tmp_path / "run"
    shutil.copytree(finetuned_cascade["root"], root)
    path = root / "checkpoints" / "finetune.pt"
    state = checkpoint.load(path)
    bias = [k for k in state["state_dict"] if k.startswith("reference.module.") and k.endswith("bias")][-1]
    state["state_dict"][bias][0] += 1e4  # a copy that answers class 0 for every image: far outside the tolerance
    checkpoint.save_atomic(state, path)
    p = convert.Pipeline(convert.ConvertConfig.from_run(root), root, progress=False, data=quick_data)
    report = p.report_phase()
    assert report["fallback"] is None and report["static_stage"] == "untouched"
    cert = report["dynamic"]["certificate"]
    assert cert["confidence"] == pytest.approx(1 - (1 - report["confidence"]) / 2)
    assert report["dynamic"]["mac_ratio"] < 1
    assert all(o["static_stage"] == "untouched" for o in report["operating_points"] if not o["static_fallback"])
    assert "untouched static network" in (root / "report.md").read_text()
    shipped, arch = dynamic_from_files(quick_data, str(root / "checkpoints" / "dynamic.pt"), model_name="resnet20",
                                       arch=None, tolerance=0.0)
    x = next(iter(Batches(quick_data.test, quick_data.info, 16)))[0]
    with torch.no_grad():
        last = shipped.materialise(arch).forward_all(x)[-1]
        torch.testing.assert_close(last, p.static.eval()(x), atol=1e-4, rtol=1e-4)  # the static network itself
        assert (p.supernet.reference.module(x).argmax(1) == 0).all()  # the distilled copy is back in place


def test_last_stage_costs_the_static_model(sn):
    a = cascade((0.5, "output")).validate(sn.graph)
    reusing = MultiStageArch.from_dict({"stages": [{"width": 0.5, "exit": "output"}, {"width": 1.0, "exit": "output"}]})
    reusing_macs, _ = stage_macs(list(sn.materialise(reusing, fold_bn=False).stages), SHAPE)
    macs, _ = stage_macs(list(sn.materialise(a, fold_bn=False).stages), SHAPE)
    info = DatasetInfo("fashion-mnist", 10, 1, 28, (0.5,), (0.25,), hflip=False)
    assert macs[0] == reusing_macs[0]
    assert macs[1] == static_cost(sn.static, info).total_macs  # the price: stage 1 is paid again


def test_the_space_offers_recompute_only_where_it_is_valid(sn):
    space = SearchSpace(sn.graph, max_stages=3)
    w = {v: i for i, v in enumerate(space.widths)}
    d = Decision("recompute", 1)
    assert space.options(d, {("width", 0): w[0.5], ("width", 1): w[1.0]}, 2)[:2].tolist() == [True, True]
    assert space.options(d, {("width", 0): w[1.0], ("width", 1): w[1.0]}, 2)[:2].tolist() == [True, False]
    assert space.options(d, {("width", 0): w[0.25], ("width", 1): w[0.5]}, 2)[:2].tolist() == [True, False]
    # a recomputing stage reads nothing, so its reuse flags take one value: one network, one key
    reuse = Decision("reuse", 1, 0)
    chosen = {("width", 0): w[0.5], ("width", 1): w[1.0], ("recompute", 1): 1}
    assert space.options(reuse, chosen, 2)[:2].tolist() == [False, True]
    assert space.options(reuse, {**chosen, ("recompute", 1): 0}, 2)[:2].tolist() == [True, True]
    assert all(dd.kind != "recompute" for dd in space.decisions(1))  # a one-stage arch has nothing to cascade
    rng = np.random.default_rng(0)
    archs = [space.sample(rng) for _ in range(300)]  # build() validates every one
    assert sum(a.is_cascade for a in archs) > 10


def test_onnx_export_runs_the_cascade(sn, x, tmp_path):
    a = cascade((0.5, "output")).validate(sn.graph)
    with torch.no_grad():
        conf = torch.softmax(sn.forward_stages(x, a)[0], 1).max(1).values.sort().values
    net = sn.materialise(a.with_thresholds([float(conf[len(conf) // 2 - 1] + conf[len(conf) // 2]) / 2]))
    ref_logits, ref_exit = net(x)
    assert set(ref_exit.tolist()) == {0, 1}
    meta = export(net, SHAPE, tmp_path, "onnx")
    assert meta["stages"][1]["inputs"] == ["image"]
    logits, exits = ExportedDynamicNet(tmp_path)(x)
    assert torch.equal(exits, ref_exit)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=0)


def test_every_search_starts_from_pruned_networks_and_their_cascades(sn):
    space = SearchSpace(sn.graph)
    seeds = space.seeds()
    narrow = [w for w in space.widths if w < 1]
    pruned = [a for a in seeds if a.num_stages == 1]
    cascades = [a for a in seeds if a.is_cascade]
    assert [a.stages[0].width for a in pruned] == narrow and all(a.stages[0].exit == "output" for a in pruned)
    assert [a.stages[0].width for a in cascades] == narrow
    assert all(a.num_stages == 2 and a.stages[0].exit == "output" for a in cascades)
    assert space.depth_only() in seeds
    assert len({a.key() for a in seeds}) == len(seeds)
    # a space without one-stage archs gets no pruned networks
    assert all(a.num_stages >= 2 for a in SearchSpace(sn.graph, min_stages=2).seeds())


def test_the_early_depth_only_seed_exits_after_each_sections_first_block(sn):
    space = SearchSpace(sn.graph)
    early, late = space.depth_only(early=True), space.depth_only()
    assert [(s.width, s.exit) for s in early.stages] == [(1.0, "layer1.0"), (1.0, "layer2.0"), (1.0, "output")]
    assert [s.exit for s in late.stages] == ["layer1.2", "layer2.2", "output"]
    assert early in space.seeds() and late in space.seeds()
    early_macs, _ = stage_macs(list(sn.materialise(early, fold_bn=False).stages), SHAPE)
    late_macs, _ = stage_macs(list(sn.materialise(late, fold_bn=False).stages), SHAPE)
    static = static_cost(sn.static, DatasetInfo("fashion-mnist", 10, 1, 28, (0.5,), (0.25,), hflip=False)).total_macs
    assert early_macs[0] < 0.15 * static < late_macs[0]  # one block of the first section, not three
    assert sum(early_macs) == pytest.approx(sum(late_macs), rel=0.02)  # the whole network either way, plus heads


def test_the_sandwich_trains_pruned_networks_at_distinct_widths_every_batch(sn):
    space = SearchSpace(sn.graph)
    sample = space.sandwich(pruned=3, random_archs=1)
    rng = np.random.default_rng(0)
    widths = set()
    for _ in range(40):
        *pruned, other = sample(rng)
        assert len(pruned) == 3 and len({a.stages[0].width for a in pruned}) == 3
        assert all(a.num_stages == 1 and a.stages[0].exit == "output" and a.stages[0].width < 1 for a in pruned)
        other.validate(sn.graph)
        widths |= {a.stages[0].width for a in pruned}
    assert widths == {w for w in space.widths if w < 1}  # every narrow width gets trained
    largest, smallest, *rest = space.sandwich(pruned=1, anchors=True)(rng)  # BigNAS's anchors come first
    assert largest.key() == MultiStageArch.from_dict({"stages": [{"width": 1.0, "exit": "output"}]}).key()
    assert smallest == space.smallest() and len(rest) == 2
    assert len(SearchSpace(sn.graph, min_stages=2).sandwich()(rng)) == 1  # no one-stage archs in that space
    pruned_only = space.sandwich(pruned=3, random_archs=0)(rng)  # the small budget's steps
    assert len(pruned_only) == 3 and all(a.num_stages == 1 and a.stages[0].width < 1 for a in pruned_only)


def test_the_report_runs_the_static_model_once_per_held_out_split(finetuned_cascade, quick_data, monkeypatch):
    """A distilled cascade's report builds a threshold chooser per twin, and each compares against the static
    model on the search's validation images and on the calibration split: those answers are computed once."""
    import s2d.pipeline.convert as convert

    root = finetuned_cascade["root"]
    p = convert.Pipeline(convert.ConvertConfig.from_run(root), root, progress=False, data=quick_data)
    runs: list[int] = []
    real = convert.logits

    def counted(model, split, *args, **kwargs):
        if model is p.static:
            runs.append(len(split))
        return real(model, split, *args, **kwargs)

    monkeypatch.setattr(convert, "logits", counted)
    choosers = [p.threshold_chooser(full_width=False, confidence=c) for c in (0.9, 0.95, 0.9)]
    val = p.search_val.subset(p.budget.report_val_images)
    assert sorted(runs) == sorted([len(val), len(p.calib)])  # two splits, one run each
    for split, correct in ((val, choosers[0].val.static_correct), (p.calib, choosers[0].static_correct)):
        assert torch.equal(correct, real(p.static, split, quick_data.info).argmax(1) == split.labels)
    assert all(c.calib.static_correct is choosers[0].static_correct for c in choosers)
    assert choosers[1].val.static_accuracy == pytest.approx(choosers[0].val.static_correct.float().mean().item())
