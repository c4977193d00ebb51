"""What the transform engine makes of a model, for ``s2d doctor``: before a user spends an hour converting it.

A model converts when it traces; the question is how much of it splits. The report
lists the exits, how many convs split along channels (and in which units, for grouped
convs), the ops kept whole with where they sit and why, and checks the one promise
everything else rests on: the one-stage arch reproduces the static logits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from s2d.transform.graph import Rule, TrunkNode


@dataclass
class WholeOp:
    """One op with no channel rule (metadata ops such as shape reads are left out)."""

    node: str
    module: str  # the innermost module it is created in ("" at the top level)
    why: str


@dataclass
class Diagnosis:
    exits: list[str]
    convs: int
    split_convs: int  # convs whose output channels a narrow stage cuts
    grouped_units: dict[str, int]  # grouped conv -> units a width split keeps whole (its groups, or fewer)
    whole_ops: list[WholeOp] = field(default_factory=list)
    whole_convs: list[str] = field(default_factory=list)  # convs kept at full width by a whole op
    one_stage_error: float = float("nan")  # max |logit diff| / max |logit| of the one-stage arch

    @property
    def depth_only(self) -> bool:
        """Nothing splits: stages differ only in where they exit."""
        return self.split_convs == 0

    def reasons(self) -> Counter:
        return Counter(w.why for w in self.whole_ops)

    def to_dict(self) -> dict:
        return {**asdict(self), "depth_only": self.depth_only}


def _module_of(t: TrunkNode) -> str:
    scopes = t.node.meta.get("scopes") or []
    return scopes[-1] if scopes else ""


def diagnose(model: nn.Module, input_shape: tuple[int, int, int], seed: int = 0) -> Diagnosis:
    """Analyse ``model`` as the engine will (raises the engine's one-line errors) and check one-stage
    exactness on a random batch."""
    from s2d.transform.arch import static_arch
    from s2d.transform.supernet import SuperNet

    model = model.eval()
    sn = SuperNet(model, input_shape, 10).eval()
    graph = sn.graph
    convs = [t for t in graph.trunk if t.rule in (Rule.CONV, Rule.GROUPED)]
    d = Diagnosis(
        exits=graph.exit_names, convs=len(convs), split_convs=sum(t.quantum < t.channels for t in convs),
        grouped_units={_module_of(t) or t.name: t.channels // t.quantum for t in convs
                       if t.rule is Rule.GROUPED and t.quantum not in (1, t.channels)},
        whole_ops=[WholeOp(t.name, _module_of(t), t.why) for t in graph.trunk
                   if t.rule is Rule.WHOLE and "tensor_meta" in t.node.meta],
        whole_convs=[_module_of(t) or t.name for t in convs if t.quantum == t.channels and t.channels > 1])
    x = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = model(x)
        (got,) = sn.forward_stages(x, static_arch())
    d.one_stage_error = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
    return d
