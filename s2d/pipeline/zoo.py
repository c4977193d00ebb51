"""``s2d zoo add``: measure a trained checkpoint and add it to the zoo's manifest.

Manifest figures are measured here from the checkpoint itself, never typed in.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from s2d import checkpoint
from s2d.data import load_dataset
from s2d.errors import CheckpointError
from s2d.measure.accuracy import accuracy
from s2d.measure.cost import static_cost
from s2d.models import get_model
from s2d.models.zoo import MANIFEST, ZOO_DIR, load_manifest
from s2d.runs import write_json_atomic


def add_to_zoo(ckpt_path: str | Path, *, name: str | None, command: str, data_dir: str | None = None,
               zoo_dir: Path = ZOO_DIR) -> dict[str, Any]:
    """Measure a model checkpoint and copy it into the zoo with a manifest entry."""
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
