"""``MultiStageArch``: one point of the search space, as a small validated JSON value.

Example::

    {"stages": [{"width": 0.25, "exit": "layer1.2", "reuse": true},
                {"width": 1.0, "exit": "output", "reuse": true}],
     "exit_rule": "max_softmax", "thresholds": [0.9]}

``reuse`` is one flag for every section or a list with one flag per section (a section
is a run of layers at one resolution). Stage 1 has nothing to reuse; its flag is ignored.

``width`` is one number for every section or a list with one per section (non-uniform pruning,
e.g. ``[0.25, 0.375, 0.5]``: narrow where activations are large and narrow convs are slow per MAC,
wider where they are small). A list of equal widths is that one width.

``"recompute": true`` (last stage only, full width) makes the last stage the static
network itself, run from the image on its own copy of the weights: a cascade. It costs
the whole static network on top of the earlier stages, but an image that reaches it gets
the static prediction (or better: the final fine-tune distils that copy from the static
model), so narrow early stages are never paid for with a weaker final stage (S2DNAS's
reusing last stage lacks the blocks where old channels read new ones).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from s2d.errors import ArchError, S2DError
from s2d.transform.exit_rule import check_thresholds, confidence, gate_confidence
from s2d.transform.graph import OUTPUT_EXIT, ModelGraph, Rule, Width, section_width

WIDTH_GRID: tuple[float, ...] = tuple(i / 8 for i in range(1, 9))
MAX_STAGES = 4


@dataclass(frozen=True)
class Stage:
    width: Width  # one for every section, or one per section; equal ones collapse to one (one key per network)
    exit: str
    reuse: tuple[bool, ...] | bool = True
    recompute: bool = False  # the static network from the image (last stage, full width): see the module doc

    def __post_init__(self) -> None:
        w = self.width
        if isinstance(w, list | tuple):
            w = tuple(float(x) for x in w)
            w = w[0] if w and len(set(w)) == 1 else w
        object.__setattr__(self, "width", float(w) if isinstance(w, int | float) else w)

    def reuse_in(self, section: int) -> bool:
        return self.reuse if isinstance(self.reuse, bool) else self.reuse[section]

    def width_in(self, section: int) -> float:
        return section_width(self.width, section)

    @property
    def per_section(self) -> bool:
        """Widths differ between sections."""
        return isinstance(self.width, tuple)

    def widths(self, sections: int) -> tuple[float, ...]:
        """One width per section."""
        return tuple(self.width_in(k) for k in range(sections))

    @property
    def mean_width(self) -> float:
        """One number for features and plots (the root mean square: MACs grow with width squared)."""
        ws = self.width if isinstance(self.width, tuple) else (self.width,)
        return math.sqrt(sum(w * w for w in ws) / len(ws))

    def to_dict(self) -> dict[str, Any]:
        d = {"width": list(self.width) if isinstance(self.width, tuple) else self.width, "exit": self.exit,
             "reuse": self.reuse if isinstance(self.reuse, bool) else list(self.reuse)}
        if self.recompute:  # absent when off, so the keys of reusing archs stay what they were
            d["recompute"] = True
        return d


@dataclass(frozen=True)
class MultiStageArch:
    stages: tuple[Stage, ...]
    exit_rule: str = "max_softmax"
    thresholds: tuple[float, ...] = field(default=())
    # per-stage softmax temperatures (empty: all 1), fitted on held-out data so that a confidence means the
    # same at every exit; exit decisions read the confidence of logits / temperature
    temperatures: tuple[float, ...] = field(default=())
    # per-stage learned exit gates (empty: the exit rule decides), one weight vector for every stage but the last,
    # fitted on held-out data after the search; a gated stage's confidence is the gate's, on logits / temperature
    gates: tuple[tuple[float, ...], ...] = field(default=())

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def final_width(self) -> Width:
        """Width of the last stage: below 1 the arch runs a pruned network when every stage runs."""
        return self.stages[-1].width

    @property
    def is_cascade(self) -> bool:
        """The last stage is the static network recomputed from the image, on a copy of its weights that
        supernet training never touches (only the final fine-tune distils it, on its own)."""
        return self.stages[-1].recompute

    @property
    def trained_stages(self) -> int:
        """Stages trained on the shared weights: all but a recomputed static last stage (a copy of its own)."""
        return self.num_stages - int(self.is_cascade)

    @property
    def is_full_width(self) -> bool:
        """Every stage at width 1: the static network plus exit heads (SDN-style), no weight block dropped."""
        return all(s.width == 1.0 for s in self.stages)

    def key(self) -> str:
        """Identity of the network (stages only): thresholds do not change the stage outputs."""
        return json.dumps([s.to_dict() for s in self.stages], sort_keys=True)

    def stage_key(self, stage: int) -> str:
        """Identity of stage ``stage``'s computation: it depends on the stages before it only, and the last stage
        differs from the same stage followed by others (it hands on no cache), so costs are cached per key."""
        return MultiStageArch(self.stages[: stage + 1]).key() + ("|last" if stage == self.num_stages - 1 else "")

    def canonical(self, graph: ModelGraph) -> MultiStageArch:
        """The one encoding of this network on ``graph``: reuse flags that change nothing (the first stage's, a
        recomputing stage's, sections where ``reuse_matters`` is false) set to true and collapsed to one flag
        when all agree, so that two encodings of one network never get two keys (two evaluations, two
        archive entries). Assumes a validated arch."""
        stages, prev_w, prev_e = [], 0.0, -1
        for i, s in enumerate(self.stages):
            flags = [s.reuse_in(k) or i == 0 or s.recompute
                     or not reuse_matters(graph, k, prev_w, s.width, prev_e) for k in range(graph.num_sections)]
            reuse = flags[0] if len(set(flags)) == 1 else tuple(flags)
            stages.append(Stage(s.width, s.exit, reuse, s.recompute))
            prev_w, prev_e = s.width, graph.exit(s.exit).index
        return replace(self, stages=tuple(stages))

    def to_dict(self) -> dict[str, Any]:
        d = {"stages": [s.to_dict() for s in self.stages], "exit_rule": self.exit_rule,
             "thresholds": list(self.thresholds)}
        if self.temperatures:
            d["temperatures"] = list(self.temperatures)
        if self.gates:
            d["gates"] = [list(g) for g in self.gates]
        return d

    def confidence(self, stage: int, logits: torch.Tensor) -> torch.Tensor:
        """Stage ``stage``'s exit-rule confidence, after its temperature."""
        if self.temperatures:
            logits = logits / self.temperatures[stage]
        if stage < len(self.gates):  # the last stage has no gate: nobody goes on from it
            return gate_confidence(logits, self.gates[stage])
        return confidence(self.exit_rule, logits)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def with_thresholds(self, thresholds: list[float] | tuple[float, ...]) -> MultiStageArch:
        return replace(self, thresholds=tuple(float(t) for t in thresholds))

    def with_temperatures(self, temperatures: list[float] | tuple[float, ...]) -> MultiStageArch:
        return replace(self, temperatures=tuple(float(t) for t in temperatures))

    def with_gates(self, gates: list[list[float]] | tuple[tuple[float, ...], ...]) -> MultiStageArch:
        return replace(self, gates=tuple(tuple(float(w) for w in g) for g in gates))

    def exit_params(self) -> str:
        """Identity of everything besides the stages and thresholds that decides exits (temperatures, gates)."""
        return json.dumps([self.exit_rule, list(self.temperatures), [list(g) for g in self.gates]])

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MultiStageArch:
        if not isinstance(d, dict) or not isinstance(d.get("stages"), list) or not d["stages"]:
            raise ArchError('arch must be a JSON object with a non-empty "stages" list')
        stages = []
        for i, s in enumerate(d["stages"], 1):
            if not isinstance(s, dict) or "width" not in s or "exit" not in s:
                raise ArchError(f'stage {i}: needs "width" and "exit" (and optionally "reuse")')
            reuse = s.get("reuse", True)
            if isinstance(reuse, list):
                if not all(isinstance(r, bool) for r in reuse):
                    raise ArchError(f"stage {i}: reuse list must hold true/false values")
                reuse = tuple(reuse)
            elif not isinstance(reuse, bool):
                raise ArchError(f"stage {i}: reuse must be true/false or a list of them, got {reuse!r}")
            raw = s["width"]
            try:
                if isinstance(raw, list):
                    if not raw or any(isinstance(w, bool) for w in raw):
                        raise TypeError
                    width: Width = tuple(float(w) for w in raw)
                else:
                    width = float(raw)
            except (TypeError, ValueError):
                raise ArchError(f"stage {i}: width must be a number or a list of numbers (one per section), "
                                f"got {raw!r}") from None
            recompute = s.get("recompute", False)
            if not isinstance(recompute, bool):
                raise ArchError(f"stage {i}: recompute must be true or false, got {recompute!r}")
            stages.append(Stage(width, str(s["exit"]), reuse, recompute))
        thresholds = d.get("thresholds", [])
        if not isinstance(thresholds, list) or not all(
            isinstance(t, int | float) and not isinstance(t, bool) for t in thresholds
        ):
            raise ArchError("thresholds must be a list of numbers")
        rule = d.get("exit_rule", "max_softmax")
        if not isinstance(rule, str):
            raise ArchError(f"exit_rule must be a name, got {rule!r}")
        check_thresholds(rule, [float(t) for t in thresholds])
        temps = d.get("temperatures", [])
        if not isinstance(temps, list) or not all(
            isinstance(t, int | float) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in temps
        ) or (temps and len(temps) != len(stages)):
            raise ArchError(f"temperatures must be a list of {len(stages)} positive numbers (one per stage)")
        gates = d.get("gates", [])
        if not isinstance(gates, list) or (gates and len(gates) != len(stages) - 1) or not all(
            isinstance(g, list) and g and len({len(h) for h in gates}) == 1 and all(
                isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w) for w in g)
            for g in gates
        ):
            raise ArchError(f"gates must be a list of {len(stages) - 1} equally long lists of numbers (one per stage "
                            "but the last), as s2d convert writes them")
        return cls(tuple(stages), rule, tuple(float(t) for t in thresholds), tuple(float(t) for t in temps),
                   tuple(tuple(float(w) for w in g) for g in gates))

    @classmethod
    def load(cls, path: str | Path) -> MultiStageArch:
        try:
            d = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise S2DError(f"arch file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ArchError(f"arch file {path} is not valid JSON ({e})") from None
        return cls.from_dict(d)

    def validate(self, graph: ModelGraph) -> MultiStageArch:
        """Check the arch against a model; every error names the stage and field."""
        names = graph.exit_names
        if not 1 <= len(self.stages) <= MAX_STAGES:
            raise ArchError(f"an arch has 1 to {MAX_STAGES} stages, got {len(self.stages)}")
        check_thresholds(self.exit_rule, self.thresholds)
        if self.thresholds and len(self.thresholds) != len(self.stages) - 1:
            raise ArchError(f"thresholds needs one value per stage but the last ({len(self.stages) - 1}), "
                            f"got {len(self.thresholds)}")
        sections = graph.num_sections
        prev_w, prev_e = (0.0,) * sections, -1
        for i, s in enumerate(self.stages, 1):
            if s.per_section and len(s.width) != sections:
                raise ArchError(f"stage {i}: width has {len(s.width)} values but the model has {sections} sections "
                                "(give one width, or one per section)")
            widths = s.widths(sections)
            for w in widths:
                if not any(abs(w - g) < 1e-9 for g in WIDTH_GRID):
                    grid = ", ".join(str(Fraction(g).limit_denominator(8)) for g in WIDTH_GRID)
                    raise ArchError(f"stage {i}: width {w} is off the grid ({grid})")
            if s.exit not in names:
                raise ArchError(f"stage {i}: unknown exit {s.exit!r}; valid: {', '.join(names)}")
            e = names.index(s.exit)
            for k, (w, p) in enumerate(zip(widths, prev_w, strict=True)):
                if w < p - 1e-9:
                    where = f" in section {k + 1}" if sections > 1 else ""
                    raise ArchError(f"stage {i}: width {w}{where} is smaller than stage {i - 1}'s {p}")
            if e < prev_e:
                raise ArchError(f"stage {i}: exit {s.exit!r} comes before stage {i - 1}'s exit {names[prev_e]!r}")
            if e == prev_e and all(abs(w - p) < 1e-9 for w, p in zip(widths, prev_w, strict=True)):
                raise ArchError(f"stage {i}: same width and exit as stage {i - 1} (it would compute nothing)")
            if not isinstance(s.reuse, bool) and len(s.reuse) != graph.num_sections:
                raise ArchError(f"stage {i}: reuse has {len(s.reuse)} flags but the model has "
                                f"{graph.num_sections} sections")
            if s.recompute and (i < len(self.stages) or i == 1 or s.width != 1.0):
                raise ArchError(f"stage {i}: only the last stage of two or more may recompute, at width 1 "
                                "(it is the static network itself)")
            if s.recompute and all(p == 1.0 for p in prev_w):
                raise ArchError(f"stage {i}: recompute after a full-width stage {i - 1} only repeats its work; "
                                "use reuse instead")
            prev_w, prev_e = widths, e
        last = self.stages[-1]
        if last.exit != OUTPUT_EXIT:  # its width may be below 1: then the whole arch is a pruned network
            raise ArchError(f"stage {len(self.stages)} (the last) must exit at {OUTPUT_EXIT!r}, got {last.exit!r}")
        return self


def reuse_matters(graph: ModelGraph, section: int, prev_width: Width, width: Width, prev_exit_index: int) -> bool:
    """Whether a stage's reuse flag for ``section`` changes its network: only where one of the section's dense
    convs computes new output channels at a node an earlier stage already reached (elsewhere every new channel
    reads all input channels either way) and its input has channels of both stages to choose between."""
    for t in graph.trunk:
        if t.rule is not Rule.CONV or t.section != section or t.index > prev_exit_index:
            continue
        p = graph.by_name[t.inputs[0]]
        if p.rule is Rule.INPUT or t.width_channels(width) <= t.width_channels(prev_width):
            continue
        if p.width_channels(prev_width) < p.width_channels(width):
            return True
    return False


def static_arch() -> MultiStageArch:
    """The one-stage arch: the static model itself."""
    return MultiStageArch((Stage(1.0, OUTPUT_EXIT, True),))
