"""Training layouts: the faster memory layout is measured, and training in either gives the same network."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from s2d.models import get_model
from s2d.runs import Run
from s2d.training.distill import kd_finetune
from s2d.training.layout import TIMED_STEPS, channels_last_is_safe, faster_layout, safe_channels, time_layouts
from s2d.training.supernet import SupernetConfig, train_archs
from s2d.transform.arch import MultiStageArch
from s2d.transform.supernet import SuperNet
from tests.test_prune import _synthetic, _teacher


@pytest.mark.parametrize("slow", [torch.contiguous_format, torch.channels_last])
def test_the_layout_whose_steps_run_faster_wins(slow):
    calls = []

    def step(layout: torch.memory_format) -> None:
        calls.append(layout)
        if layout == slow:
            time.sleep(0.02)

    seconds = time_layouts(step)
    assert len(calls) == 2 * (1 + TIMED_STEPS)  # one untimed call per layout, then the timed ones
    assert faster_layout(seconds) != slow
    assert seconds[next(iter(seconds))] < 0.01 < seconds[list(seconds)[-1]]


def test_no_layout_is_timed_on_an_accelerator():
    seconds = time_layouts(lambda layout: pytest.fail("timed on cuda"), device="cuda")
    assert seconds == {} and faster_layout(seconds) == torch.contiguous_format


@pytest.mark.parametrize("width, safe", [(1.0, True), (0.5, "AVX2"), (0.25, False), (0.125, False)])
def test_networks_with_narrow_convs_are_not_trained_in_channels_last(width, safe):
    """oneDNN's NHWC backward of a strided 1x1 conv over fewer channels than its block is broken (issue #6035)."""
    sn = SuperNet(get_model("resnet20", 10, 1), (1, 28, 28), 10).train()
    arch = MultiStageArch.from_dict({"stages": [{"width": width, "exit": "output"}]})
    x = torch.randn(2, 1, 28, 28)
    if safe == "AVX2":  # 8/16/32 channels: enough for AVX2's block of 8, not for AVX-512's 16
        safe = torch.backends.cpu.get_cpu_capability() == "AVX2"
    assert channels_last_is_safe(lambda: sn.forward_stages(x, arch)) is safe  # the stem reads 1 channel: allowed
    depthwise = torch.nn.Conv2d(32, 32, 3, groups=32)  # 1 channel a group
    assert channels_last_is_safe(lambda: depthwise(torch.randn(2, 32, 8, 8)))
    # the zoo's MobileNetV2 reads 8 channels somewhere (and 1 a group in its depthwise convs): AVX2's block only
    assert channels_last_is_safe(lambda: get_model("mobilenetv2", 10, 1)(x)) is (safe_channels() == 8)
    assert not channels_last_is_safe(lambda: torch.nn.Conv2d(4, 8, 1, stride=2)(torch.randn(2, 4, 8, 8)))


def _conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.dim() == 4]


def test_kd_finetune_trains_the_same_weights_in_either_layout_and_hands_them_back_in_the_default_one():
    data = _synthetic()
    teacher = _teacher(data)
    start = copy.deepcopy(teacher)
    trained = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        student = copy.deepcopy(start)
        params = list(student.parameters())
        out = kd_finetune(student, teacher, data, steps=1, batch_size=32, progress=False, layout=layout)
        assert out["channels_last"] == float(layout == torch.channels_last)
        assert list(student.parameters()) == params and all(w.is_contiguous() for w in _conv_weights(student))
        trained[layout] = student.state_dict()
    # the same step up to rounding: channels-last batch norm rounds its training statistics more coarsely
    # (s2d.training.layout), which parts the layouts, by far less than the step moved the weights (training is
    # chaotic: within 50 steps float32 and float64 training part as far, in either layout)
    for k, v in trained[torch.contiguous_format].items():
        if v.is_floating_point() and v.dim() == 4:
            moved = (v - start.state_dict()[k]).norm()
            apart = (trained[torch.channels_last][k] - v).norm()
            assert moved > 0 and apart < 0.05 * moved, (k, apart.item(), moved.item())


def test_kd_finetune_measures_the_layout_on_a_copy_by_default():
    data = _synthetic()
    teacher = _teacher(data)
    student = copy.deepcopy(teacher)
    stats = {k: v.clone() for k, v in student.named_buffers()}
    out = kd_finetune(student, teacher, data, steps=1, batch_size=32, progress=False, lr=0.0)
    assert out["channels_last"] in (0.0, 1.0) and out["steps"] == 1
    # the timing steps ran on a copy: the student's batch norm counted its one training batch, not eight more
    assert student.bn1.num_batches_tracked.item() == stats["bn1.num_batches_tracked"].item() + 1


def test_an_arch_drawn_again_trains_in_its_faster_layout_with_the_same_gradients(tmp_path, monkeypatch):
    torch.manual_seed(0)
    sn = SuperNet(get_model("resnet20", 10, 1), (1, 28, 28), 10)
    # full width: safe on AVX-512 too (every conv reads 1 or at least 16 channels; width 0.5 reads 8)
    arch = MultiStageArch.from_dict({"stages": [{"width": 1.0, "exit": "output"}]})
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    grads = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        sn.training_layouts[arch.key()] = layout
        sn.train().zero_grad(set_to_none=True)
        sn.forward_stages(x, arch)[0].square().sum().backward()
        conv = sn.static.get_submodule("layer2.0.conv1").weight
        assert conv.is_contiguous(memory_format=layout)
        grads[layout] = [p.grad.clone() for p in sn.parameters() if p.grad is not None]
    for a, b in zip(*grads.values(), strict=True):  # up to the coarser rounding of channels-last batch norm
        assert (a - b).norm() <= 0.02 * b.norm() + 1e-6

    # train_archs times the layouts when the arch comes a second time, and the timing steps leave no trace: the same
    # weights and batch-norm statistics as a run that times nothing
    import s2d.training.supernet as trainer

    def train(name: str, time_layouts) -> dict[str, torch.Tensor]:
        monkeypatch.setattr(trainer, "time_layouts", time_layouts)
        net = copy.deepcopy(start)
        train_archs(net, copy.deepcopy(start.static).eval(), data, lambda rng: [arch],
                    SupernetConfig(steps=3, batch_size=16, checkpoint_every=3), Run(tmp_path / name),
                    ckpt_name="t.pt", tag="t", progress=False)
        assert net.training_layouts == {arch.key(): torch.contiguous_format}
        return net.state_dict()

    timed: list[str] = []

    def timing(step, device="cpu", steps=TIMED_STEPS) -> dict[str, float]:
        for layout in (torch.contiguous_format, torch.channels_last):
            for _ in range(1 + steps):
                step(layout)
        timed.append(arch.key())
        return {"default": 0.1, "channels_last": 0.2}

    sn.training_layouts.clear()
    start, data = copy.deepcopy(sn), _synthetic()
    plain = train("plain", lambda step, device="cpu", steps=TIMED_STEPS: {})
    with_timing = train("timed", timing)
    assert timed == [arch.key()]  # at its second draw, once
    for k, v in plain.items():
        assert torch.equal(with_timing[k], v), k
