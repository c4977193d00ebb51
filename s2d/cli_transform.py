"""CLI commands of the transform engine (filled in with the engine)."""

from __future__ import annotations


def add_commands(sub, add_model_args, add_data_args, add_runtime_args) -> None:
    return None
