"""The model zoo: pretrained checkpoints in ``model_zoo/`` and their manifest.

Manifest figures are measured by ``s2d zoo add`` from the checkpoint itself
(test/validation accuracy, fvcore MACs, parameters, sha256), never typed in.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from s2d import checkpoint
from s2d.data import DatasetInfo, load_dataset
from s2d.errors import CheckpointError, S2DError
from s2d.models import check_model_name, get_model
from s2d.runs import write_json_atomic

ZOO_DIR = Path(__file__).resolve().parent.parent / "model_zoo"
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


def add_to_zoo(ckpt_path: str | Path, *, name: str | None, command: str, data_dir: str | None = None,
               zoo_dir: Path = ZOO_DIR) -> dict[str, Any]:
    """Measure a model checkpoint and copy it into the zoo with a manifest entry."""
    from s2d.cost import static_cost
    from s2d.evaluation import accuracy

    ckpt = checkpoint.load(ckpt_path)
    if "model" not in ckpt:
        raise CheckpointError(f"{ckpt_path} is not a model checkpoint; use checkpoints/model.pt from a train-base run")
    name = name or ckpt["model"]
    data = load_dataset(ckpt["dataset"], data_dir=data_dir)
    model = get_model(ckpt["model"], ckpt["num_classes"], ckpt["in_channels"], image_size=ckpt["image_size"])
    checkpoint.load_into(model, ckpt["state_dict"], str(ckpt_path))
    model.eval()
    cost = static_cost(model, data.info)
    file = f"{name}-{data.info.name}.pt"
    zoo_dir.mkdir(parents=True, exist_ok=True)
    # Store only what is needed to rebuild the model: keeps files small and loadable.
    slim = checkpoint.model_checkpoint(model, model_name=ckpt["model"], num_classes=ckpt["num_classes"],
                                       in_channels=ckpt["in_channels"], image_size=ckpt["image_size"],
                                       dataset=ckpt["dataset"])
    tmp = zoo_dir / f".{file}.new"
    checkpoint.save_atomic(slim, tmp)
    entry = {
        "name": name,
        "architecture": ckpt["model"],
        "dataset": data.info.name,
        "file": file,
        "test_accuracy": round(accuracy(model, data.test, data.info), 4),
        "val_accuracy": round(accuracy(model, data.val, data.info), 4),
        "val_split": {"val_size": data.val_size, "split_seed": data.split_seed},
        "macs": int(cost.total_macs),
        "conv_macs": int(cost.by_operator.get("conv", 0)),
        "params": sum(p.numel() for p in model.parameters()),
        "input": [data.info.in_channels, data.info.image_size, data.info.image_size],
        "sha256": checkpoint.sha256(tmp),
        "command": command,
    }
    shutil.move(tmp, zoo_dir / file)
    entries = [e for e in load_manifest(zoo_dir) if not (e["name"] == name and e["dataset"] == entry["dataset"])]
    write_json_atomic(zoo_dir / MANIFEST, {"models": [*entries, entry]})
    return entry
