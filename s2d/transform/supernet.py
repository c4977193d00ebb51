"""``SuperNet``: the static model's weights, once, plus an exit head per (exit, width).

Every ``MultiStageArch`` of the model is a sub-network of the supernet: its stages are
generated (``stages.build_stages``) over the shared weights, so training one arch
trains the weights every other arch uses too.

A recomputing (cascade) last stage runs ``reference``, a frozen copy of the static
network, so training the shared weights never changes it (the final fine-tune of a
cascade distils it on its own: ``s2d.pipeline.convert.Pipeline.distil_static_stage``).

Batch norm: channels are sliced from the shared layers, so an arch uses the static
model's running statistics by default. Off-diagonal blocks that an arch drops (reuse
off, channels of later stages) shift the distribution of a layer's output, so
``recalibrate_bn`` re-estimates the statistics for one arch from a few training
batches (cumulative average, as in slimmable networks) before it is materialised.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from s2d.errors import ArchError
from s2d.transform.arch import WIDTH_GRID, MultiStageArch
from s2d.transform.dynamic import DynamicNet
from s2d.transform.exit_rule import NEVER_EXIT, gate_size
from s2d.transform.graph import OUTPUT_EXIT, ModelGraph, analyze
from s2d.transform.sliced import ExitHead, FrozenModule
from s2d.transform.stages import StagePlan, build_stages, head_key, materialise


class SuperNet(nn.Module):
    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], num_classes: int,
                 widths: Iterable[float] = WIDTH_GRID, plan_cache_size: int = 64, head_hidden: int = 0) -> None:
        """``head_hidden`` units give every full-width exit head a hidden layer (``ExitHead``): those heads read
        the static network's features as they are; narrow stages' heads train with their backbone and stay linear."""
        super().__init__()
        self.graph: ModelGraph = analyze(model, input_shape)
        self.static = self.graph.gm
        # the static network as it came, for recomputing (cascade) last stages: frozen, never re-normed here
        self.reference = FrozenModule(copy.deepcopy(self.graph.gm))
        self.num_classes = num_classes
        self.widths = tuple(widths)
        self.head_hidden = head_hidden
        heads = {}
        for e in self.graph.exits:
            for w in self.widths:
                if e.name == OUTPUT_EXIT and w == 1.0:
                    continue  # the static classifier (the tail) serves here
                heads[head_key(e.name, w)] = ExitHead(e.width_channels(w), num_classes, e.spatial,
                                                      hidden=head_hidden if w == 1.0 else 0)
        self.heads = nn.ModuleDict(heads)
        self._plans: OrderedDict[str, StagePlan] = OrderedDict()
        self._plan_cache_size = plan_cache_size
        self.bn_source: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
        self._bn_arch: str | None = None  # the arch whose statistics the BN buffers hold
        self._layout = torch.contiguous_format  # of the shared conv weights (see ``_match_layout``)
        # the memory layout each arch's training steps run in, by arch key (measured by the trainer:
        # ``s2d.training.layout``); an arch not in it trains in the default layout
        self.training_layouts: dict[str, torch.memory_format] = {}

    def use_arch_statistics(self, source: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None,
                            num_batches: int = 8) -> None:
        """Give every arch its own batch-norm statistics, estimated from ``source()`` batches.

        For a supernet trained with batch statistics (each arch normalises its own
        activations), the shared running buffers belong to no arch. With a source set, an
        eval-mode forward or ``materialise`` of an arch first re-estimates them for that arch
        (once; a training step or a state-dict load invalidates them). ``None`` keeps the
        buffers as they are (frozen static statistics).
        """
        self.bn_source, self._bn_batches, self._bn_arch = source, num_batches, None

    def ensure_statistics(self, arch: MultiStageArch) -> None:
        """Make the BN buffers hold ``arch``'s statistics (a no-op without a source)."""
        if self.bn_source is None or self._bn_arch == arch.key():
            return
        self.recalibrate_bn(arch, self.bn_source(), num_batches=self._bn_batches)
        self._bn_arch = arch.key()

    def train(self, mode: bool = True) -> SuperNet:
        if mode:
            self._bn_arch = None
        return super().train(mode)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._bn_arch = None
        return super().load_state_dict(state_dict, strict, assign)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return self.graph.input_shape

    def validate(self, arch: MultiStageArch) -> MultiStageArch:
        if arch.gates and len(arch.gates[0]) != gate_size(self.num_classes):
            raise ArchError(f"the arch's exit gates read {len(arch.gates[0])} weights but a {self.num_classes}-class "
                            f"network's gates have {gate_size(self.num_classes)}; the arch is from another model")
        return arch.validate(self.graph)

    def plan(self, arch: MultiStageArch) -> StagePlan:
        """Generated stages of ``arch`` over the shared weights (cached, LRU)."""
        key = arch.key()
        plan = self._plans.get(key)
        if plan is None:
            self.validate(arch)
            plan = build_stages(self.graph, arch, self.heads, self.reference.module)
            self._plans[key] = plan
            if len(self._plans) > self._plan_cache_size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        for st in plan.stages:
            st.train(self.training)
        return plan

    def forward_stages(self, x: torch.Tensor, arch: MultiStageArch, upto: int | None = None) -> list[torch.Tensor]:
        """Every stage's logits (the first ``upto`` stages'), each computed from the previous one's cache."""
        if not self.training:
            self.ensure_statistics(arch)
        self._match_layout(x, arch)
        outs, cache = [], ()
        for stage in self.plan(arch).stages[:upto]:
            res = stage(x, *cache)
            outs.append(res[0])
            cache = tuple(res[1:])
        return outs

    def _match_layout(self, x: torch.Tensor, arch: MultiStageArch) -> None:
        """Shared conv weights in channels-last for forwards without gradients on the CPU (evaluations, batch-norm
        estimates: ResNet-20's static stage 1.5x faster, MobileNetV2's 1.7x); a training step in the layout
        ``training_layouts`` gives its arch, else the default one: channels-last training is faster only for some
        shapes (``s2d.training.layout``). The weights change layout in place (the same parameters, so the
        optimizer's references hold), only when the layout wanted changes. Evaluations give the same numbers up to
        the order of float sums; channels-last training rounds batch statistics more coarsely. Not under
        torch.distributed: DDP requires every rank's parameters to have the same strides, and only rank 0 runs the
        progress probe."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if x.device.type != "cpu" or distributed:
            want = torch.contiguous_format
        elif not torch.is_grad_enabled():
            want = torch.channels_last
        elif self.training_layouts:  # (no arch key to build on every training forward while nothing is timed)
            want = self.training_layouts.get(arch.key(), torch.contiguous_format)
        else:
            want = torch.contiguous_format
        if want != self._layout:
            self.to(memory_format=want)
            self._layout = want

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The static model (full width, final exit)."""
        return self.static(x)

    @torch.no_grad()
    def recalibrate_bn(self, arch: MultiStageArch, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       num_batches: int = 20) -> None:
        """Re-estimate batch-norm statistics for ``arch`` (every channel is computed once per batch)."""
        self._bn_arch = None
        bns = [m for m in self.static.modules() if isinstance(m, nn.BatchNorm2d)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
        was_training = self.training
        self.train()
        try:
            for i, (x, _) in enumerate(batches):
                if i >= num_batches:
                    break
                for m in bns:
                    m.momentum = 1.0 / (i + 1)  # cumulative average over the batches seen
                self.forward_stages(x, arch, upto=arch.trained_stages)  # a recomputing stage has no own norms
        finally:
            for m, mom in zip(bns, saved, strict=True):
                m.momentum = mom
            self.train(was_training)

    def restore_static(self, static: nn.Module) -> None:
        """Put the static model's weights and batch-norm statistics back into the backbone, and keep them
        (no per-arch statistics): full-width archs then compute the static network exactly."""
        own = self.static.state_dict()
        self.static.load_state_dict({k: v for k, v in static.state_dict().items() if k in own})
        self.use_arch_statistics(None)

    @contextmanager
    def reference_weights(self, static: nn.Module) -> Iterator[None]:
        """Inside the block, recomputing last stages run on ``static``'s weights (a cascade whose copy was
        distilled, ending in the untouched static network instead: no disagreement with the static model where
        images reach it, which a tight certified tolerance needs); the copy's own weights are put back after."""
        ref = self.reference.module
        kept = {k: v.clone() for k, v in ref.state_dict().items()}
        ref.load_state_dict({k: v for k, v in static.state_dict().items() if k in kept})
        try:
            yield
        finally:
            ref.load_state_dict(kept)

    def materialise(self, arch: MultiStageArch, fold_bn: bool = True) -> DynamicNet:
        """A standalone ``DynamicNet`` with the arch's weights copied out (thresholds required)."""
        if len(arch.thresholds) != arch.num_stages - 1:
            arch = arch.with_thresholds([NEVER_EXIT] * (arch.num_stages - 1))
        self.ensure_statistics(arch)
        plan = self.plan(arch)
        stages = [materialise(s, fold_bn=fold_bn) for s in plan.stages]
        return DynamicNet(arch, stages, plan.cache_in, plan.cache_out).eval()


DYNAMIC_FORMAT = "s2d-dynamic-v1"


def dynamic_checkpoint(supernet: SuperNet, arch: MultiStageArch, meta: dict) -> dict:
    """What rebuilds a ``DynamicNet``: the model's identity, the arch and the supernet weights
    (with the arch's batch-norm statistics in the buffers)."""
    supernet.ensure_statistics(arch)
    return {"format": DYNAMIC_FORMAT, **meta, "arch": arch.to_dict(), "head_hidden": supernet.head_hidden,
            "state_dict": {k: v.detach().cpu() for k, v in supernet.state_dict().items()}}


def is_dynamic_checkpoint(obj: dict) -> bool:
    return obj.get("format") == DYNAMIC_FORMAT
