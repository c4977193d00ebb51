"""The search space of one model as a sequence of decisions.

An arch is built decision by decision: the number of stages, then for every stage its
width (with ``section_widths``, then whether it tapers: one grid step narrower in the first
section and wider in the last, see :meth:`SearchSpace.taper`), its exit point, one
feature-reuse flag per section and (when thresholds are searched, EDANAS-style) its exit
threshold; the last stage also chooses whether it recomputes the static network from the
image (a cascade) instead of reusing features.
``options(partial)`` says which choices keep the arch valid (widths and exits never go
backwards, two stages never coincide, the last stage exits at ``output``), so an agent
can be masked and a sampler is uniform over valid choices.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from s2d.transform.arch import MAX_STAGES, WIDTH_GRID, MultiStageArch, Stage, reuse_matters, static_arch
from s2d.transform.graph import OUTPUT_EXIT, ModelGraph, Width

THRESHOLD_GRID: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.99)
SWEEP_LIMIT = 200  # full-width archs every search scores before it starts (ResNet-20 has 129 of up to 4 stages)


def nearest_option(mask: np.ndarray, option: int) -> int:
    """The valid option closest to ``option`` (ties: the lower): how an out-of-mask choice is read."""
    valid = np.flatnonzero(mask)
    return int(valid[np.argmin(np.abs(valid - option))])


@dataclass(frozen=True)
class Decision:
    kind: str  # "stages" | "width" | "taper" | "exit" | "recompute" | "reuse" | "threshold"
    stage: int  # 0-based stage index (-1 for "stages")
    section: int = -1  # for "reuse"


@dataclass
class SearchSpace:
    graph: ModelGraph
    widths: tuple[float, ...] = WIDTH_GRID
    max_stages: int = MAX_STAGES
    min_stages: int = 1  # one stage at width w < 1 is a uniformly pruned static network
    search_thresholds: bool = False
    exit_rule: str = "max_softmax"
    section_widths: bool = False  # each stage may taper its width over the sections (:meth:`taper`)
    exits: list[str] = field(init=False)

    @functools.cached_property
    def exit_mac_shares(self) -> dict[str, float]:
        """Static MACs up to each exit over the whole network's (fvcore, once): a stage's rough cost before it
        is evaluated, for the reward predictor."""
        from s2d.measure.cost import exit_macs

        macs = exit_macs(self.graph, self.graph.input_shape)
        return {name: m / macs[-1] for name, m in zip(self.graph.exit_names, macs, strict=True)}

    def __post_init__(self) -> None:
        self.exits = self.graph.exit_names
        if not 1 <= self.min_stages <= self.max_stages <= MAX_STAGES:
            raise ValueError(f"need 1 <= min_stages <= max_stages <= {MAX_STAGES}")

    @property
    def num_sections(self) -> int:
        return self.graph.num_sections

    @property
    def max_options(self) -> int:
        return max(len(self.widths), len(self.exits), 2, len(THRESHOLD_GRID), self.max_stages + 1)

    def taper(self, w: int) -> tuple[float, ...]:
        """Width ``w`` (an index of ``widths``) tapered over the sections: one grid step narrower in the first
        section, one wider in the last (clipped to the grid), the middle ones at ``w``; uniform for one section.

        Where activations are large, narrow convs are slow per MAC on a CPU, and a uniformly pruned network spends
        most of its time there: on ResNet-20 (this machine, batch 256) the prefix 4/12/32 runs at 3.48x the static
        throughput with 6.87x fewer MACs, where the uniform 6/12/24 runs at 3.04x with 7.07x; pruned by
        Torch-Pruning and distilled for 3000 steps both reach 92.7 % on validation images."""
        n = self.num_sections
        offsets = [0] * n if n == 1 else [round(2 * k / (n - 1) - 1) for k in range(n)]
        return tuple(self.widths[min(len(self.widths) - 1, max(0, w + o))] for o in offsets)

    def _shape(self, w: int, tapered: int) -> tuple[float, ...]:
        return self.taper(w) if tapered else (self.widths[w],) * self.num_sections

    def _shapes(self, w: int) -> list[int]:
        """The taper options width ``w`` has: uniform, and tapered where that differs."""
        return [0, 1] if self.section_widths and len(set(self.taper(w))) > 1 else [0]

    def stage_widths(self, s: int, chosen: dict[tuple, int]) -> tuple[float, ...] | None:
        """Stage ``s``'s width per section, once chosen."""
        if ("width", s) not in chosen:
            return None
        return self._shape(chosen[("width", s)], chosen.get(("taper", s), 0))

    def decisions(self, num_stages: int) -> list[Decision]:
        """The decisions after the number of stages, in order."""
        out = []
        for s in range(num_stages):
            last = s == num_stages - 1
            out.append(Decision("width", s))
            if self.section_widths:
                out.append(Decision("taper", s))
            if not last:  # the last stage exits at the output
                out.append(Decision("exit", s))
            elif s > 0:
                out.append(Decision("recompute", s))
            if s > 0:
                out += [Decision("reuse", s, k) for k in range(self.num_sections)]
            if self.search_thresholds and not last:
                out.append(Decision("threshold", s))
        return out

    def max_decisions(self) -> int:
        return 1 + len(self.decisions(self.max_stages))

    def options(self, decision: Decision, chosen: dict[tuple, int], num_stages: int) -> np.ndarray:
        """Boolean mask over option indices that keep the arch valid."""
        mask = np.zeros(self.max_options, dtype=bool)
        n_w, n_e = len(self.widths), len(self.exits)
        if decision.kind == "stages":
            mask[self.min_stages:self.max_stages + 1] = True
            return mask
        s = decision.stage
        prev = self.stage_widths(s - 1, chosen) or (0.0,) * self.num_sections  # per section
        prev_e = chosen.get(("exit", s - 1), -1)
        later = num_stages - 1 - s  # stages after this one, the last included
        index = {w: i for i, w in enumerate(self.widths)}

        def lowest_exit(shape: tuple[float, ...]) -> int:  # a stage equal to the previous one computes nothing
            return max(prev_e, 0) if shape != prev else prev_e + 1

        def feasible(shape: tuple[float, ...], e: int) -> bool:  # later stages must still be strictly larger
            widen = int(len(set(shape)) > 1)  # a tapered stage can be followed at its widest width, uniform
            return later <= (n_w - 1 - index[max(shape)]) + (n_e - 1 - e) + widen

        def fits(shape: tuple[float, ...]) -> bool:  # never narrower than the previous stage in any section
            if any(a < b for a, b in zip(shape, prev, strict=True)):
                return False
            e = lowest_exit(shape)
            return e <= n_e - 1 if later == 0 else e < n_e and feasible(shape, e)

        if decision.kind == "width":
            for w in range(n_w):
                mask[w] = any(fits(self._shape(w, t)) for t in self._shapes(w))
        elif decision.kind == "taper":
            w = chosen[("width", s)]
            for t in self._shapes(w):
                mask[t] = fits(self._shape(w, t))
        elif decision.kind == "exit":
            shape = self.stage_widths(s, chosen)
            for e in range(lowest_exit(shape), n_e):
                mask[e] = feasible(shape, e)
        elif decision.kind == "reuse":  # one option where the flag changes nothing: one encoding, one key
            mask[1] = True
            mask[0] = not chosen.get(("recompute", s), 0) and reuse_matters(
                self.graph, decision.section, prev, self.stage_widths(s, chosen),
                self.graph.exit(self.exits[prev_e]).index)
        elif decision.kind == "recompute":  # the static network itself, after narrower stages only
            mask[0] = True
            mask[1] = set(self.stage_widths(s, chosen)) == {1.0} and s > 0 and min(prev) < 1.0
        elif decision.kind == "threshold":
            mask[:len(THRESHOLD_GRID)] = True
        return mask

    def build(self, num_stages: int, chosen: dict[tuple, int]) -> MultiStageArch:
        stages = []
        for s in range(num_stages):
            last = s == num_stages - 1
            width: Width = self.stage_widths(s, chosen) or 1.0
            exit_ = OUTPUT_EXIT if last else self.exits[chosen[("exit", s)]]
            reuse = tuple(bool(chosen.get(("reuse", s, k), 1)) for k in range(self.num_sections))
            stages.append(Stage(width, exit_, reuse[0] if len(set(reuse)) == 1 else reuse,
                                bool(chosen.get(("recompute", s), 0))))
        thresholds = ()
        if self.search_thresholds:
            thresholds = tuple(THRESHOLD_GRID[chosen[("threshold", s)]] for s in range(num_stages - 1))
        return MultiStageArch(tuple(stages), self.exit_rule, thresholds).validate(self.graph)

    def genome_slots(self) -> list[tuple]:
        """The fixed-length integer encoding a genetic searcher evolves: one gene per decision key of the
        largest arch (the stage count, then per stage width, exit, recompute, reuse flags, threshold)."""
        slots: list[tuple] = [("stages", -1)]
        for s in range(self.max_stages):
            slots += [("width", s), *([("taper", s)] if self.section_widths else []), ("exit", s), ("recompute", s)]
            slots += [("reuse", s, k) for k in range(self.num_sections)]
            if self.search_thresholds:
                slots.append(("threshold", s))
        return slots

    def gene_bounds(self) -> np.ndarray:
        """The largest option of each gene (its decision's option count minus one)."""
        highest = {"stages": self.max_stages, "width": len(self.widths) - 1, "taper": 1, "exit": len(self.exits) - 1,
                   "recompute": 1, "reuse": 1, "threshold": len(THRESHOLD_GRID) - 1}
        return np.asarray([highest[slot[0]] for slot in self.genome_slots()], dtype=np.int64)

    def encode(self, arch: MultiStageArch) -> np.ndarray:
        """A genome that :meth:`decode` reads back as ``arch`` (a canonical arch of this space): what a mutation
        starts from. Genes of decisions the arch does not make are 0."""
        genes = np.zeros(len(self.genome_slots()), dtype=np.int64)
        slot = {k: i for i, k in enumerate(self.genome_slots())}
        genes[0] = arch.num_stages
        for s, st in enumerate(arch.stages):
            w, tapered = self._encode_width(st)
            genes[slot[("width", s)]] = w
            if self.section_widths:
                genes[slot[("taper", s)]] = tapered
            genes[slot[("exit", s)]] = self.exits.index(st.exit) if st.exit in self.exits else len(self.exits) - 1
            genes[slot[("recompute", s)]] = int(st.recompute)
            for k in range(self.num_sections):
                genes[slot[("reuse", s, k)]] = int(st.reuse_in(k))
            if self.search_thresholds and s < len(arch.thresholds):
                genes[slot[("threshold", s)]] = int(np.abs(np.asarray(THRESHOLD_GRID) - arch.thresholds[s]).argmin())
        return genes

    def _encode_width(self, st: Stage) -> tuple[int, int]:
        """(width index, tapered) of a stage of this space."""
        shape = st.widths(self.num_sections)
        for w in range(len(self.widths)):
            for t in self._shapes(w):
                if self._shape(w, t) == shape:
                    return w, t
        raise ValueError(f"width {st.width} is not a width of this search space")

    def decode(self, genes: np.ndarray | list[int]) -> MultiStageArch:
        """The valid arch a genome stands for: each decision takes its gene's option, or the nearest valid one
        (the rule ``MultiStageEnv`` applies to unmasked actions), so every genome is a network and genes of
        decisions the arch does not make are ignored."""
        slot = {k: i for i, k in enumerate(self.genome_slots())}
        n = nearest_option(self.options(Decision("stages", -1), {}, 0), int(genes[0]))
        chosen: dict[tuple, int] = {}
        for d in self.decisions(n):
            key = self.key_of(d)
            chosen[key] = nearest_option(self.options(d, chosen, n), int(genes[slot[key]]))
        return self.build(n, chosen)

    def size(self, canonical: bool = True) -> int:
        """Encodings in the space: with ``canonical`` as the masks allow them (one per network), else with every
        reuse flag free as the space once had them (many encodings of one network). Counted, not enumerated:
        reuse and threshold choices never constrain later decisions, so they multiply."""
        def count(decisions: list[Decision], i: int, chosen: dict[tuple, int], n: int) -> int:
            if i == len(decisions):
                return 1
            d = decisions[i]
            valid = np.flatnonzero(self.options(d, chosen, n))
            if d.kind == "reuse" and not canonical:
                return (1 if chosen.get(("recompute", d.stage), 0) else 2) * count(decisions, i + 1, chosen, n)
            if d.kind in ("reuse", "threshold"):
                return len(valid) * count(decisions, i + 1, chosen, n)
            total = 0
            for o in valid:
                chosen[self.key_of(d)] = int(o)
                total += count(decisions, i + 1, chosen, n)
            chosen.pop(self.key_of(d), None)
            return total

        stages = np.flatnonzero(self.options(Decision("stages", -1), {}, 0))
        return sum(count(self.decisions(int(n)), 0, {}, int(n)) for n in stages)

    @staticmethod
    def key_of(d: Decision) -> tuple:
        return (d.kind, d.stage, d.section) if d.kind == "reuse" else (d.kind, d.stage)

    def sample(self, rng: np.random.Generator) -> MultiStageArch:
        """A uniformly random valid choice at every decision."""
        n = int(rng.choice(np.flatnonzero(self.options(Decision("stages", -1), {}, 0))))
        chosen: dict[tuple, int] = {}
        for d in self.decisions(n):
            chosen[self.key_of(d)] = int(rng.choice(np.flatnonzero(self.options(d, chosen, n))))
        return self.build(n, chosen)

    def smallest(self) -> MultiStageArch:
        """The small end of the sandwich rule: a quarter-width first stage exiting at the end of the
        first section (narrower or earlier stages are too weak to train usefully), then the full network."""
        ends = [e for i, e in enumerate(self.graph.exits[:-1]) if self.graph.exits[i + 1].section != e.section]
        exit_ = (ends or self.graph.exits[:-1] or self.graph.exits)[0].name
        width = self.widths[min(1, len(self.widths) - 1)] if exit_ != OUTPUT_EXIT else self.widths[0]
        return MultiStageArch((Stage(width, exit_, True), Stage(1.0, OUTPUT_EXIT, True)),
                              self.exit_rule).validate(self.graph)

    def sandwich(self, pruned: int = 3, random_archs: int = 1, anchors: bool = False
                 ) -> Callable[[np.random.Generator], list[MultiStageArch]]:
        """Sampler for supernet training: ``pruned`` uniformly pruned networks at distinct random narrow widths
        and ``random_archs`` random archs per batch; with ``anchors`` also BigNAS's largest arch (the static
        network) and the smallest, first.

        The pruned networks are the first stages of the cascades (and what a static pruner ships), and narrow
        widths need the most steps: how a cascade ranks depends on how well its narrow stage is trained.
        Measured on ResNet-20 (cascades [w, static] scored on validation data after training the widths
        0.25 .. 0.75, two per batch): at 120 steps per width 0.5 out-ranks 0.375, at 240 0.375 leads, as it does
        after each is fine-tuned alone for 1500 steps. No anchors by default: a cascade's last stage is the frozen
        static network, full-width archs are scored on the static weights, and every arch is distilled from
        the static model, so the static network, the costliest arch of each batch, buys the ranking nothing."""
        largest, smallest = static_arch(), self.smallest()
        narrow = [w for w in self.widths if w < 1]

        def pruned_net(w: float, rng: np.random.Generator) -> MultiStageArch:
            i = self.widths.index(w)
            options = self._shapes(i)  # with section_widths, half of them tapered (no draw otherwise: same stream)
            tapered = int(rng.choice(options)) if len(options) > 1 else 0
            return MultiStageArch((Stage(self._shape(i, tapered), OUTPUT_EXIT, True),), self.exit_rule)

        def sample(rng: np.random.Generator) -> list[MultiStageArch]:
            widths = rng.choice(narrow, size=min(pruned, len(narrow)), replace=False) if self.min_stages == 1 else []
            return [*([largest, smallest] if anchors else []),
                    *(pruned_net(float(w), rng) for w in widths),
                    *(self.sample(rng) for _ in range(random_archs))]

        return sample

    # Special cases of the space, used as baselines.
    def depth_only(self, num_stages: int = 3, *, early: bool = False) -> MultiStageArch:
        """SDN-style: full width, exits spread over the network (section ends first). ``early``: exits after the
        first block of the first sections instead (the stem's own exit skipped), cheap full-width exits; with
        hidden-layer heads they answer most easy images (ResNet-20 on Fashion-MNIST: right on 89 % of them after
        ``layer1.0``, 12 % of the MACs)."""
        exits = self.graph.exits[:-1]
        if early:
            starts = exits[1:2] + [e for i, e in enumerate(exits) if i > 1 and exits[i - 1].section != e.section]
            stages = [Stage(1.0, e.name, True) for e in starts[:num_stages - 1]]
            if not stages:  # a network with a single block before its output: nothing earlier to offer
                return self.depth_only(num_stages)
            return MultiStageArch((*stages, Stage(1.0, OUTPUT_EXIT, True)), self.exit_rule).validate(self.graph)
        ends = [e for i, e in enumerate(exits) if self.graph.exits[i + 1].section != e.section]
        picks = ends if len(ends) >= num_stages - 1 else list(exits)
        idx = np.linspace(0, len(picks) - 1, num_stages - 1).round().astype(int) if len(ends) < num_stages - 1 \
            else range(len(picks) - (num_stages - 1), len(picks))
        stages = [Stage(1.0, picks[i].name, True) for i in sorted(set(int(i) for i in idx))]
        return MultiStageArch((*stages, Stage(1.0, OUTPUT_EXIT, True)), self.exit_rule).validate(self.graph)

    def depth_only_sweep(self, limit: int = SWEEP_LIMIT) -> list[MultiStageArch]:
        """Every full-width arch (exits anywhere, the stem's too), fewest stages first, as many stage counts as
        fit in ``limit`` archs. Full-width archs share no trained weights, so each is scored exactly as deployed,
        and once every exit's logits are known a score is a threshold sweep (ResNet-20: 129 archs in 40 s). A
        search samples them rarely (full width is one option in eight at every stage): ResNet-20's full budget
        never tried an exit after the stem, whose hidden-layer head is right on 90.6 % of the validation images
        for 0.4 % of the MACs, and every one of the 8 best full-width archs of the sweep starts there."""
        early = self.exits[:-1]
        archs: list[MultiStageArch] = []
        for k in range(max(1, self.min_stages - 1), self.max_stages):
            combos = list(itertools.combinations(early, k))
            if archs and len(archs) + len(combos) > limit:
                break
            archs += [MultiStageArch((*(Stage(1.0, e, True) for e in c), Stage(1.0, OUTPUT_EXIT, True)),
                                     self.exit_rule).validate(self.graph) for c in combos]
        return archs

    def width_only(self, widths: tuple[float, ...] = (0.25, 0.5)) -> MultiStageArch:
        """S2DNAS-style: narrow-to-full stages that all exit at the output, reusing features."""
        stages = [Stage(w, OUTPUT_EXIT, True) for w in widths]
        return MultiStageArch((*stages, Stage(1.0, OUTPUT_EXIT, True)), self.exit_rule).validate(self.graph)

    def seeds(self) -> list[MultiStageArch]:
        """Known-good starting points every search evaluates first: each pruned network (one stage at width
        w < 1, uniform or tapered, what a static pruner ships) and its cascade with the static network, plus SDN-style
        depth-only exits. A uniform draw rarely lands on them (a two-stage cascade whose first stage exits at
        the output is about 1 % of the space), yet they are the archs a user compares s2d with. The early depth-only
        arch too: the small budget's 40 evaluations never drew it, and on the demo's search images it scores 0.647
        against 0.606 for the best cascade (``runs/demo-v10``)."""
        shapes = [self._shape(i, t) for i, w in enumerate(self.widths) if w < 1 for t in self._shapes(i)]
        pruned = [MultiStageArch((Stage(w, OUTPUT_EXIT, True),), self.exit_rule) for w in shapes]
        cascades = [MultiStageArch((Stage(w, OUTPUT_EXIT, True), Stage(1.0, OUTPUT_EXIT, True, recompute=True)),
                                   self.exit_rule) for w in shapes]
        depth = list(dict.fromkeys([self.depth_only(), self.depth_only(early=True)]))  # one, where they coincide
        archs = [*pruned, *cascades, *depth]
        return [a.validate(self.graph) for a in archs if a.num_stages >= self.min_stages
                and a.num_stages <= self.max_stages]

    def baselines(self) -> dict[str, MultiStageArch]:
        """The static model, SDN-style depth-only and S2DNAS-style width-only archs."""
        return {"static": static_arch(), "depth_only": self.depth_only(), "width_only": self.width_only()}
