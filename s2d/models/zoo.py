"""The model zoo: pretrained checkpoints in ``model_zoo/`` and their manifest.

Manifest figures are measured by ``s2d zoo add`` from the checkpoint itself
(test/validation accuracy, fvcore MACs, parameters, sha256), never typed in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from s2d import checkpoint
from s2d.data import DatasetInfo
from s2d.errors import CheckpointError, S2DError
from s2d.models import check_model_name, get_model

ZOO_DIR = Path(__file__).resolve().parents[2] / "model_zoo"
MANIFEST = "manifest.json"


def load_manifest(zoo_dir: Path = ZOO_DIR) -> list[dict[str, Any]]:
    path = zoo_dir / MANIFEST
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["models"]
    except (json.JSONDecodeError, KeyError) as e:
        raise S2DError(f"zoo manifest {path} is unreadable ({e}); restore it from git") from None


def find(model: str, dataset: str, zoo_dir: Path = ZOO_DIR) -> dict[str, Any] | None:
    return next((e for e in load_manifest(zoo_dir) if e["name"] == model and e["dataset"] == dataset), None)


def checkpoint_path(entry: dict[str, Any], zoo_dir: Path = ZOO_DIR) -> Path:
    return zoo_dir / entry["file"]


def resolve_weights(model: str, info: DatasetInfo, weights: str | None, zoo_dir: Path = ZOO_DIR) -> str | None:
    """Turn the CLI's ``--weights`` into what ``get_model`` takes ('zoo' → the zoo file, 'none' → None)."""
    if weights is None or weights.lower() == "none":
        return None
    if weights != "zoo":
        return weights
    entry = find(model, info.name, zoo_dir)
    if entry is None:
        check_model_name(model)  # an unknown name is reported as such, not as a zoo gap
        have = ", ".join(f"{e['name']} ({e['dataset']})" for e in load_manifest(zoo_dir)) or "nothing"
        raise S2DError(
            f"the zoo has no {model} for {info.name} (it has {have}); pass --weights PATH "
            f"(train one with `s2d train-base --model {model} --dataset {info.name}`) or --weights none"
        )
    path = checkpoint_path(entry, zoo_dir)
    if path.exists() and checkpoint.sha256(path) != entry["sha256"]:
        raise CheckpointError(f"zoo checkpoint {path} does not match its manifest sha256; restore it with "
                              f"`git checkout -- {path}`")
    return str(path)


def load_model(name: str, info: DatasetInfo, weights: str | None = "zoo") -> nn.Module:
    """A model for ``info``'s input shape, with zoo, file or torchvision weights."""
    model = get_model(name, info.num_classes, info.in_channels, resolve_weights(name, info, weights),
                      image_size=info.image_size)
    return model.eval()
