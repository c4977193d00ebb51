"""Gymnasium environments of s2d: ``gymnasium.make("s2d/MultiStage-v0", space=..., evaluate=...)``."""

from gymnasium.envs.registration import register, registry

from envs.multistage import MultiStageEnv

if "s2d/MultiStage-v0" not in registry:
    register(id="s2d/MultiStage-v0", entry_point="envs.multistage:MultiStageEnv")

__all__ = ["MultiStageEnv"]
