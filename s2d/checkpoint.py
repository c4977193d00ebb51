"""Checkpoints: atomic writes and loads that fail with a one-line reason.

A checkpoint is a dict saved with ``torch.save``; model checkpoints carry the
architecture name and input shape next to the state dict so that ``s2d eval``
can rebuild the model without being told.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from s2d.errors import CheckpointError

FORMAT = "s2d-checkpoint-v1"


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same folder, fsync, then rename: a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path or train one with `s2d train-base`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated ({reason}); delete it and re-create it "
            "(re-run the command that wrote it, or restore the file)"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a state dict")
    return obj


def model_checkpoint(model: nn.Module, *, model_name: str, num_classes: int, in_channels: int,
                     image_size: int, dataset: str, **extra: Any) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": model_name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "image_size": image_size,
        "dataset": dataset,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }


def state_dict_of(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model weights in an s2d checkpoint, a training checkpoint or a bare state dict."""
    if "state_dict" in obj:
        return obj["state_dict"]
    if "model_state" in obj:
        return obj["model_state"]
    return obj


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` whose failure names the offending keys and shapes in one line."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (checkpoint vs model), e.g. {'; '.join(shapes[:3])}")
        if missing:
            parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
        raise CheckpointError(
            f"checkpoint {source} does not match the architecture: {'; '.join(parts)}; "
            "pass the --model (and --dataset) it was trained for"
        )
    model.load_state_dict(state)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
