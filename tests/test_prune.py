"""The static peer: Torch-Pruning to a MAC ratio, rebuilding pruned checkpoints, and time-budgeted KD fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from s2d.data import Batches, Dataset, DatasetInfo, Split
from s2d.errors import CheckpointError, S2DError
from s2d.measure.cost import count_macs
from s2d.models import get_model
from s2d.training.distill import distillation_loss, kd_finetune
from s2d.training.prune import find_classifier, prune_to_mac_ratio, restore_pruned

SHAPE = (1, 28, 28)
TARGETS = (1 / 2, 1 / 3, 1 / 4)


def _macs(model: nn.Module) -> float:
    return float(count_macs(model, (torch.zeros(1, *SHAPE),)).total())


@pytest.fixture(scope="module", params=["resnet20", "mobilenetv2"])
def pruned_family(request) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    model = get_model(request.param, 10, 1)
    return model, [prune_to_mac_ratio(model, SHAPE, t) for t in TARGETS]


def test_mac_ratio_close_to_target_and_ordered(pruned_family):
    model, pruned = pruned_family
    base = _macs(model)
    ratios = []
    for target, p in zip(TARGETS, pruned, strict=True):
        measured = _macs(p.module) / base  # recounted, not the search's own figure
        assert measured == pytest.approx(p.mac_ratio)
        assert abs(measured / target - 1) < 0.10, (target, measured, p.pruning_ratio)
        ratios.append(measured)
    assert ratios[0] > ratios[1] > ratios[2]
    assert pruned[0].pruning_ratio < pruned[1].pruning_ratio < pruned[2].pruning_ratio


def test_pruned_model_runs_and_keeps_the_classes(pruned_family):
    model, pruned = pruned_family
    x = torch.randn(5, *SHAPE)
    for p in pruned:
        out = p.module.eval()(x)
        assert out.shape == (5, 10)
        assert torch.isfinite(out).all()
    assert _macs(model) == pytest.approx(pruned[0].base_macs)  # the original was not touched


def test_restore_pruned_rebuilds_from_shapes_alone(pruned_family):
    model, pruned = pruned_family
    p = pruned[2]
    other = copy.deepcopy(model)
    with torch.no_grad():
        for param in other.parameters():
            param.mul_(-1.5)  # other weights, other importance ranking: widths must still come from the shapes
    rebuilt = restore_pruned(other, p.module.state_dict(), SHAPE).eval()
    x = torch.randn(3, *SHAPE)
    assert torch.equal(rebuilt(x), p.module.eval()(x))
    state = pruned[0].module.state_dict()
    stem = next(k for k, v in state.items() if v.ndim == 4)
    wider = {**state, stem: torch.cat([state[stem], state[stem]])}  # wider than the unpruned stem
    with pytest.raises(CheckpointError):
        restore_pruned(model, wider, SHAPE)


class TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_group_l2_keeps_the_largest_channels():
    """Every tensor a channel touches (conv out, BN, next layer's input) is scaled by that channel's
    size, in a shuffled order: group-L2 importance must keep exactly the largest channels."""
    torch.manual_seed(0)
    model = TwoConv()
    size1 = torch.randperm(8).float() + 1  # channel k of conv1's group has size size1[k]
    size2 = torch.randperm(16).float() + 1
    with torch.no_grad():
        model.conv1.weight.copy_(size1.view(8, 1, 1, 1).expand(8, 1, 3, 3))
        model.bn1.weight.copy_(size1)
        model.conv2.weight.copy_(size2.view(16, 1, 1, 1) * size1.view(1, 8, 1, 1) / 8)
        model.bn2.weight.copy_(size2)
        model.fc.weight.copy_(size2.view(1, 16).expand(10, 16))
    p = prune_to_mac_ratio(model, SHAPE, 1 / 4)
    kept1 = p.module.conv1.weight[:, 0, 0, 0]
    kept2 = p.module.bn2.weight.detach()
    assert 0 < len(kept1) < 8 and 0 < len(kept2) < 16
    # the survivors are the largest channels, in their original order
    assert set(kept1.tolist()) == set(size1.sort(descending=True).values[: len(kept1)].tolist())
    assert kept1.tolist() == [s for s in size1.tolist() if s in set(kept1.tolist())]
    assert set(kept2.tolist()) == set(size2.sort(descending=True).values[: len(kept2)].tolist())
    assert p.module.fc.out_features == 10 and p.module.fc.in_features == len(kept2)


def test_classifier_found_and_unreachable_targets_refused():
    model = get_model("mobilenetv2", 10, 1)
    assert find_classifier(model, torch.zeros(1, *SHAPE)) is model.classifier[1]
    with pytest.raises(S2DError, match="cannot reach"):
        prune_to_mac_ratio(TwoConv(), SHAPE, 1e-4)
    with pytest.raises(S2DError):
        prune_to_mac_ratio(TwoConv(), SHAPE, 1.5)


def _synthetic(n_train: int = 320) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=g),
                     torch.randint(0, 10, (n,), generator=g))

    info = DatasetInfo("synthetic", 10, 1, 28, (0.5,), (0.29,), hflip=True)
    return Dataset(info=info, train=split(n_train), val=split(64), test=split(64), split_seed=0, val_size=64)


def _teacher(data: Dataset) -> nn.Module:
    torch.manual_seed(0)
    teacher = get_model("resnet20", 10, 1).train()
    with torch.no_grad():  # confident logits (a fresh ResNet's are nearly uniform: nothing to distil)
        for name, param in teacher.named_parameters():
            if name.endswith("bn2.weight"):
                param.fill_(1.0)
        teacher.fc.weight.mul_(10)
    with torch.no_grad():  # batch-norm statistics of this data, so the teacher's eval mode is sensible
        for x, _ in Batches(data.train, data.info, 64):
            teacher(x)
    return teacher.eval()


class Recorder:
    """A SummaryWriter stand-in that records steps and can simulate a kill at a given step."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.steps: list[int] = []
        self.texts: dict[str, str] = {}
        self.kill_at = kill_at

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.kill_at is not None and step >= self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        self.steps.append(step)

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        self.texts[tag] = text

    def flush(self) -> None:
        pass


def _kd_loss(student: nn.Module, teacher: nn.Module, data: Dataset) -> float:
    x, y = next(iter(Batches(data.train, data.info, 128)))
    with torch.no_grad():
        return distillation_loss(student.eval()(x), teacher(x), y, 2.0, 0.7).item()


def test_kd_finetune_lowers_the_loss_within_budget(tmp_path):
    data = _synthetic()
    teacher = _teacher(data)
    student = prune_to_mac_ratio(teacher, SHAPE, 1 / 3).module
    before = _kd_loss(student, teacher, data)
    writer = Recorder()
    out = kd_finetune(student, teacher, data, seconds=3, batch_size=32, progress=False, writer=writer,
                      checkpoint_path=tmp_path / "kd.pt")
    after = _kd_loss(student, teacher, data)
    assert after < 0.9 * before, (before, after)
    assert out["steps"] >= 10 and out["steps"] <= out["planned_steps"]
    assert out["seconds"] < 3 + 5 * out["step_seconds"] + 0.5  # stops at the budget
    assert out["steps"] == out["planned_steps"] or out["seconds"] >= 3
    assert writer.steps and writer.steps[-1] <= out["steps"]
    assert writer.texts == {"kd_finetune/layout": "channels_last" if out["channels_last"] else "default"}
    # a finished run called again does not train again
    again = kd_finetune(student, teacher, data, seconds=3, batch_size=32, progress=False,
                        checkpoint_path=tmp_path / "kd.pt")
    assert again["steps"] == out["steps"] and again["resumed_from_step"] == out["steps"]
    with pytest.raises(CheckpointError, match="other settings"):
        kd_finetune(student, teacher, data, seconds=4, batch_size=32, progress=False,
                    checkpoint_path=tmp_path / "kd.pt")


def test_kd_finetune_for_a_step_count_runs_exactly_that_many(tmp_path):
    """A conversion's fine-tunes are step counts, not wall clocks: the same network on a loaded machine."""
    data = _synthetic()
    teacher = _teacher(data)
    student = prune_to_mac_ratio(teacher, SHAPE, 1 / 2).module
    writer = Recorder()
    out = kd_finetune(student, teacher, data, steps=12, batch_size=32, progress=False, writer=writer,
                      checkpoint_path=tmp_path / "kd.pt")
    assert out["steps"] == out["planned_steps"] == 12 and writer.steps[-1] == 10
    assert torch.load(tmp_path / "kd.pt", weights_only=True)["config"]["steps"] == 12
    with pytest.raises(CheckpointError, match="steps 12 -> 13"):  # another schedule: refused, not mixed
        kd_finetune(student, teacher, data, steps=13, batch_size=32, progress=False, checkpoint_path=tmp_path / "kd.pt")
    for budget in ({}, {"steps": 5, "seconds": 1.0}, {"steps": 0}):
        with pytest.raises(S2DError, match="steps"):
            kd_finetune(student, teacher, data, batch_size=32, progress=False, **budget)


class FakeClock:
    """``time`` for kd_finetune, advanced by the teacher: each call costs ``step`` seconds, the calls in
    ``slow`` cost ``slow_step`` (a machine busy for a moment while the schedule is being sized)."""

    def __init__(self, step: float, slow_step: float, slow: range) -> None:
        self.now, self.calls, self.step, self.slow_step, self.slow = 0.0, 0, step, slow_step, slow

    def perf_counter(self) -> float:
        return self.now

    def tick(self) -> None:
        self.calls += 1
        self.now += self.slow_step if self.calls in self.slow else self.step


def test_a_slow_start_does_not_shorten_the_schedule(monkeypatch):
    """The schedule is sized on a share of the budget, not on a few steps: six slow steps alone would
    plan a cosine that ends after a tenth of the budget, and a peer would get less time than s2d."""
    import s2d.training.distill as distill

    clock = FakeClock(step=0.1, slow_step=1.0, slow=range(3, 9))
    monkeypatch.setattr(distill, "time", clock)
    monkeypatch.setattr(distill, "PROBE_FRACTION", 0.2)
    data = _synthetic()
    linear = nn.Sequential(nn.Flatten(), nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], 10))

    class Teacher(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            clock.tick()
            return linear(x).detach()

    student = nn.Sequential(nn.Flatten(), nn.Linear(SHAPE[0] * SHAPE[1] * SHAPE[2], 10))
    out = kd_finetune(student, Teacher(), data, seconds=100, batch_size=32, progress=False)
    # six slow steps alone: 1 s a step, a plan of about 99 steps, ended at 15 s of the 100
    assert out["steps"] == out["planned_steps"] and out["seconds"] > 65, out
    monkeypatch.setattr(distill, "PROBE_FRACTION", 0.0)  # the old probe, for contrast
    clock.now, clock.calls = 0.0, 0
    short = kd_finetune(student, Teacher(), data, seconds=100, batch_size=32, progress=False)
    assert short["seconds"] < 20, short


def test_kd_finetune_resumes_after_a_kill(tmp_path):
    data = _synthetic()
    teacher = _teacher(data)
    path = tmp_path / "kd.pt"
    student = prune_to_mac_ratio(teacher, SHAPE, 1 / 2).module
    with pytest.raises(KeyboardInterrupt):
        # 6 s: a plan of more than 10 steps even beside a second test worker (3 s once planned exactly 10)
        kd_finetune(student, teacher, data, seconds=6, batch_size=32, progress=False, checkpoint_path=path,
                    checkpoint_every=4, writer=Recorder(kill_at=10), metadata={"pruning_ratio": 0.3})
    saved = torch.load(path, weights_only=True)
    assert saved["step"] == 8 and saved["planned_steps"] > 10 and saved["metadata"] == {"pruning_ratio": 0.3}
    # a new process would rebuild the student from the unpruned model and the checkpoint's shapes
    resumed_student = restore_pruned(teacher, saved["state_dict"], SHAPE)
    writer = Recorder()
    out = kd_finetune(resumed_student, teacher, data, seconds=6, batch_size=32, progress=False,
                      checkpoint_path=path, checkpoint_every=4, writer=writer)
    assert out["resumed_from_step"] == 8
    assert out["planned_steps"] == saved["planned_steps"]  # the same schedule, not a new plan
    assert writer.steps[0] == 10 and out["steps"] > 10  # the count continues from the checkpoint
    assert out["seconds"] >= saved["seconds_spent"]
