"""The memory layout a network trains in: channels-last where it trains faster on this machine.

oneDNN's channels-last (NHWC) training steps are faster than the default layout's only for some shapes. On this
2-core AVX2 CPU at batch 128: a full-width ResNet-20 distillation step 1.2x faster (305 -> 250 ms), MobileNetV2's
1.2-1.3x, a width-0.5 ResNet-20 1.1-1.3x, but widths 0.625 / 0.375 / 0.25 (channel counts not a multiple of 8)
1.5x / 2.1x / 1.35x slower. The rule depends on the CPU's vector width and the library version, so it is measured,
not written down: a few steps in each layout, the faster wins. Evaluations are another matter (channels-last is
faster there for every shape measured: ``s2d.transform.stages.inference_layout``).

Channels-last training rounds more coarsely: its batch norm computes the batch statistics about 50x less
precisely (one layer: 5e-6 relative error against float64, 1e-7 in the default layout), so a trained ResNet-20's
gradients are 1.7 % off float64 against 0.01 % (relative to each tensor's largest entry). That is far below a
minibatch's own noise, and training is chaotic anyway: after 50 steps float32 weights have parted from float64 ones
by 19 % of what they moved in the default layout, 34 % in channels-last.

Channels-last is only tried on networks whose convolutions all read one channel per group or at least the CPU's
channel block (:func:`safe_channels`): oneDNN's 1x1 backward-weights kernel for strided NHWC convs with fewer input
channels than its block writes past its workspace (uxlfoundation/oneDNN issue #6035: wrong weight gradients on
some machines, a crash on others). Here, in torch 2.14.1 on AVX2, it corrupts the heap for 2-7 channels: a
width-0.125 ResNet-20's downsampling shortcut, 4 -> 8 channels, aborts the process. Such narrow networks train
slower in channels-last anyway.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

LAYOUTS = (torch.contiguous_format, torch.channels_last)
LAYOUT_NAMES = {torch.contiguous_format: "default", torch.channels_last: "channels_last"}
TIMED_STEPS = 3  # timed steps per layout, after one untimed (the first call plans kernels and allocates)


def set_layout(module: nn.Module, layout: torch.memory_format) -> nn.Module:
    """Every 4-d parameter and buffer of ``module`` in ``layout``, in place: the parameters stay the same objects,
    so an optimizer's references hold. Returns the module."""
    return module.to(memory_format=layout)


class _ConvInputs(TorchFunctionMode):
    """Records how many channels per group every 2-d convolution of a forward reads (its weight's dim 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.channels: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (F.conv2d, torch.conv2d):
            weight = args[1] if len(args) > 1 else (kwargs or {})["weight"]
            self.channels.append(int(weight.shape[1]))
        return func(*args, **(kwargs or {}))


def safe_channels() -> int:
    """oneDNN's channel block on this CPU: 8 floats on AVX2, 16 with AVX-512 (and on CPUs torch does not name)."""
    return 8 if torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT") else 16


def channels_last_is_safe(forward: Callable[[], object]) -> bool:
    """Whether every convolution ``forward()`` runs reads one channel per group (an image, a depthwise conv) or at
    least :func:`safe_channels`: only such networks are trained in channels-last (see the module's docstring)."""
    with torch.no_grad(), _ConvInputs() as convs:
        forward()
    least = safe_channels()
    return all(c == 1 or c >= least for c in convs.channels)


def time_layouts(step: Callable[[torch.memory_format], None], *, device: str | torch.device = "cpu",
                 steps: int = TIMED_STEPS) -> dict[str, float]:
    """Seconds per ``step(layout)`` (a forward and backward in that layout, without an optimizer step) for each
    layout, the faster first; empty where the choice is not made: on accelerators (channels-last pays there only
    with tensor-core dtypes, which s2d does not train in) and under torch.distributed (DDP needs the same strides
    on every rank, and ranks would time apart)."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if torch.device(device).type != "cpu" or distributed:
        return {}
    seconds = {}
    for layout in LAYOUTS:
        step(layout)
        start = time.perf_counter()
        for _ in range(steps):
            step(layout)
        seconds[LAYOUT_NAMES[layout]] = (time.perf_counter() - start) / steps
    return dict(sorted(seconds.items(), key=lambda kv: kv[1]))


def faster_layout(seconds: dict[str, float]) -> torch.memory_format:
    """The layout :func:`time_layouts` timed fastest (the default one when nothing was timed)."""
    by_name = {name: layout for layout, name in LAYOUT_NAMES.items()}
    return by_name[next(iter(seconds))] if seconds else torch.contiguous_format
