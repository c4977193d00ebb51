"""``s2d/MultiStage-v0``: build one ``MultiStageArch`` per episode, one decision per step.

Step 0 picks the number of stages; then, per stage, its width (and whether it tapers over the
sections, when the space has ``section_widths``), its exit point (the last
stage: whether it recomputes the static network instead), one feature-reuse flag per
section and (optionally) its exit threshold. Actions are
``Discrete(max_options)``; ``action_masks()`` (for sb3-contrib's MaskablePPO) marks the
choices that keep the arch valid, and an invalid action is mapped to the nearest valid
one, so unmasked agents work too. The last step evaluates the arch on the validation
split and returns its reward; every other step returns 0.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from s2d.search.space import Decision, SearchSpace, nearest_option

KINDS = ("stages", "width", "exit", "recompute", "reuse", "threshold")


class MultiStageEnv(gym.Env):
    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["ansi"], "render_fps": 1}

    def __init__(self, space: SearchSpace, evaluate: Callable[..., Any], render_mode: str | None = None) -> None:
        super().__init__()
        self.space, self.evaluate = space, evaluate
        self.render_mode = render_mode
        self.action_space = gym.spaces.Discrete(space.max_options)
        s, k = space.max_stages, space.num_sections
        # the taper decision only where the space has it: observations of other spaces keep their shape (and a
        # PPO checkpoint of an older run still loads)
        self.kinds = (*KINDS, "taper") if space.section_widths else KINDS
        self._per_stage = 5 + k + int(space.section_widths)  # set?, width, exit, threshold, recompute, reuse, taper
        size = len(self.kinds) + s + k + (s + 1) + s * self._per_stage
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(size,), dtype=np.float32)
        self._reset_state()

    def _reset_state(self) -> None:
        self.num_stages = 0
        self.chosen: dict[tuple, int] = {}
        self.queue: list[Decision] = [Decision("stages", -1)]
        self.last_info: dict[str, Any] = {}

    @property
    def decision(self) -> Decision:
        return self.queue[0]

    def action_masks(self) -> np.ndarray:
        return self.space.options(self.decision, self.chosen, self.num_stages)

    def _obs(self) -> np.ndarray:
        sp = self.space
        s_max, k = sp.max_stages, sp.num_sections
        obs = np.zeros(self.observation_space.shape, dtype=np.float32)
        d = self.decision if self.queue else None
        i = 0
        if d is not None:
            obs[self.kinds.index(d.kind)] = 1
            if d.stage >= 0:
                obs[len(self.kinds) + d.stage] = 1
            if d.section >= 0:
                obs[len(self.kinds) + s_max + d.section] = 1
        i = len(self.kinds) + s_max + k
        if self.num_stages:
            obs[i + self.num_stages] = 1
        i += s_max + 1
        n_w, n_e = len(sp.widths), len(sp.exits)
        for st in range(s_max):
            base = i + st * self._per_stage
            if st >= self.num_stages:
                continue
            obs[base] = 1
            if ("width", st) in self.chosen:
                obs[base + 1] = self.chosen["width", st] / max(1, n_w - 1)
            if ("exit", st) in self.chosen:
                obs[base + 2] = self.chosen["exit", st] / max(1, n_e - 1)
            if ("threshold", st) in self.chosen:
                obs[base + 3] = (self.chosen["threshold", st] + 1) / 10
            obs[base + 4] = self.chosen.get(("recompute", st), 0)
            for sec in range(k):
                obs[base + 5 + sec] = self.chosen.get(("reuse", st, sec), 0)
            if sp.section_widths:
                obs[base + 5 + k] = self.chosen.get(("taper", st), 0)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._reset_state()
        return self._obs(), {}

    def step(self, action) -> tuple[np.ndarray, float, bool, bool, dict]:
        a = nearest_option(self.action_masks(), int(action))
        d = self.queue.pop(0)
        if d.kind == "stages":
            self.num_stages = a
            self.queue = self.space.decisions(a)
        else:
            self.chosen[SearchSpace.key_of(d)] = a
        if self.queue:
            return self._obs(), 0.0, False, False, {}
        arch = self.space.build(self.num_stages, self.chosen)
        ev = self.evaluate(arch)
        info = {
            "arch": ev.arch, "accuracy": ev.accuracy, "average_macs": ev.average_macs, "mac_ratio": ev.mac_ratio,
            "exit_rates": ev.exit_rates, "thresholds": ev.thresholds, "cached": ev.cached,
            "meets_target": ev.meets_target,
        }
        self.last_info = info
        self.queue = [Decision("stages", -1)]  # a terminal observation still needs a decision to describe
        obs = self._obs()
        self.queue = []
        return obs, float(ev.reward), True, False, info

    def render(self) -> str | None:
        if self.render_mode == "ansi":
            return f"stages={self.num_stages} chosen={self.chosen} last={self.last_info}"
        return None
