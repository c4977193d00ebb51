"""The model zoo: `add_to_zoo` measures honestly, and the real zoo's manifest matches its checkpoints."""

from __future__ import annotations

import json

import pytest

import s2d.pipeline.zoo
from s2d import checkpoint
from s2d.errors import CheckpointError, S2DError, UnknownNameError
from s2d.measure.accuracy import accuracy
from s2d.measure.cost import static_cost
from s2d.models import get_model
from s2d.models.zoo import ZOO_DIR, load_manifest, load_model, resolve_weights
from s2d.pipeline.zoo import add_to_zoo

FIELDS = ("name", "architecture", "dataset", "file", "test_accuracy", "val_accuracy", "macs", "params",
          "sha256", "command")
REQUIRED = ("resnet20", "mobilenetv2")  # accuracy targets are checked by `s2d bench zoo`, not here
RESNET20_MACS = 31_332_416  # fvcore total for ResNet-20 on 1x28x28 (conv 31.02 M + BN, pool, fc)


@pytest.fixture
def tmp_zoo(tmp_path, monkeypatch, quick_data, tiny_run):
    """A zoo in tmp_path holding the tiny run's model; measured on the quick (500-image) splits."""
    monkeypatch.setattr(s2d.pipeline.zoo, "load_dataset", lambda name, data_dir=None: quick_data)
    zoo = tmp_path / "zoo"
    entry = add_to_zoo(tiny_run["model_pt"], name=None, command="s2d train-base --tiny", zoo_dir=zoo)
    return zoo, entry


def test_add_to_zoo_records_measured_figures(tmp_zoo, quick_data):
    zoo, entry = tmp_zoo
    manifest = json.loads((zoo / "manifest.json").read_text())["models"]
    assert manifest == [entry]
    for key in FIELDS:
        assert key in entry, key
    assert (entry["name"], entry["architecture"], entry["dataset"]) == ("resnet20", "resnet20", "fashion-mnist")
    assert entry["command"] == "s2d train-base --tiny"
    assert entry["file"] == "resnet20-fashion-mnist.pt"
    path = zoo / entry["file"]
    assert entry["sha256"] == checkpoint.sha256(path)
    assert path.stat().st_size < 2_000_000
    assert sorted(p.name for p in zoo.iterdir()) == ["manifest.json", "resnet20-fashion-mnist.pt"]  # no temp left
    # Re-measure from the zoo file itself.
    model = get_model("resnet20", 10, 1, weights=path, image_size=28).eval()
    info = quick_data.info
    assert entry["test_accuracy"] == pytest.approx(accuracy(model, quick_data.test, info), abs=1e-4)
    assert entry["val_accuracy"] == pytest.approx(accuracy(model, quick_data.val, info), abs=1e-4)
    assert entry["macs"] == int(static_cost(model, info).total_macs) == RESNET20_MACS
    assert entry["params"] == sum(p.numel() for p in model.parameters()) == 272_186  # ResNet-20, 1 input channel
    assert entry["input"] == [1, 28, 28]
    assert entry["val_split"] == {"val_size": 5000, "split_seed": 0}


def test_add_again_replaces_the_entry(tmp_zoo, tiny_run):
    zoo, first = tmp_zoo
    second = add_to_zoo(tiny_run["model_pt"], name=None, command="again", zoo_dir=zoo)
    third = add_to_zoo(tiny_run["model_pt"], name="r20-copy", command="copy", zoo_dir=zoo)
    manifest = load_manifest(zoo)
    assert [(e["name"], e["command"]) for e in manifest] == [("resnet20", "again"), ("r20-copy", "copy")]
    assert second["sha256"] == first["sha256"] == third["sha256"]  # same weights, same bytes


def test_resolve_weights(tmp_zoo, quick_data):
    zoo, entry = tmp_zoo
    info = quick_data.info
    assert resolve_weights("resnet20", info, "zoo", zoo) == str(zoo / entry["file"])
    assert resolve_weights("resnet20", info, "none", zoo) is None
    assert resolve_weights("resnet20", info, None, zoo) is None
    assert resolve_weights("resnet20", info, "some/file.pt", zoo) == "some/file.pt"


def test_missing_zoo_entry_is_one_line(tmp_zoo, quick_data, tmp_path):
    zoo, _ = tmp_zoo
    with pytest.raises(S2DError) as e:
        resolve_weights("resnet56", quick_data.info, "zoo", zoo)
    msg = str(e.value)
    assert "\n" not in msg and "no resnet56 for fashion-mnist" in msg and "resnet20 (fashion-mnist)" in msg
    assert "--weights" in msg
    with pytest.raises(S2DError) as e:
        resolve_weights("resnet20", quick_data.info, "zoo", tmp_path / "empty-zoo")
    assert "it has nothing" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UnknownNameError, match="unknown model 'resnet21'; valid: "):  # not "the zoo has no ..."
        resolve_weights("resnet21", quick_data.info, "zoo", zoo)


def test_tampered_zoo_file_fails_sha256(tmp_zoo, quick_data):
    zoo, entry = tmp_zoo
    path = zoo / entry["file"]
    ckpt = checkpoint.load(path)
    ckpt["state_dict"]["fc.bias"] = ckpt["state_dict"]["fc.bias"] + 1  # still a valid checkpoint
    checkpoint.save_atomic(ckpt, path)
    with pytest.raises(CheckpointError) as e:
        resolve_weights("resnet20", quick_data.info, "zoo", zoo)
    assert "sha256" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_manifest_is_one_line(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(S2DError) as e:
        load_manifest(tmp_path)
    assert "manifest" in str(e.value) and "\n" not in str(e.value)


def test_non_model_checkpoint_is_refused(tmp_path, tiny_run):
    with pytest.raises(CheckpointError) as e:
        add_to_zoo(tiny_run["last_pt"], name=None, command="x", zoo_dir=tmp_path / "zoo")
    assert "checkpoints/model.pt" in str(e.value)
    assert not (tmp_path / "zoo").exists()


# --- the real zoo shipped in model_zoo/ ----------------------------------------------------------------

def _real_entries() -> list[dict]:
    return load_manifest(ZOO_DIR)


def test_real_zoo_has_the_required_models():
    have = {(e["name"], e["dataset"]) for e in _real_entries()}
    assert {("resnet20", "fashion-mnist"), ("mobilenetv2", "fashion-mnist")} <= have, (
        f"model_zoo/manifest.json lists {sorted(have)}")


def _real_names() -> list[str]:
    """The required models, plus whatever else the manifest lists (so a missing model fails, not skips)."""
    return sorted(set(REQUIRED) | {e["name"] for e in _real_entries()})


def _real_entry(name: str) -> dict:
    entry = next((e for e in _real_entries() if e["name"] == name and e["dataset"] == "fashion-mnist"), None)
    assert entry is not None, f"model_zoo/manifest.json has no {name} for fashion-mnist"
    return entry


@pytest.mark.parametrize("name", _real_names())
def test_real_zoo_entry_is_what_the_manifest_says(name, fmnist):
    entry = _real_entry(name)
    for key in FIELDS:
        assert key in entry, key
    path = ZOO_DIR / entry["file"]
    assert path.stat().st_size < 5_000_000, "keep zoo checkpoints small (fp32 state dict)"
    assert checkpoint.sha256(path) == entry["sha256"]
    assert entry["command"].startswith("s2d train-base") and f"--model {entry['architecture']}" in entry["command"]
    model = load_model(entry["name"], fmnist.info, "zoo")
    # Re-measured on the first 2000 test images: within 2 points of the recorded full-test accuracy.
    acc = accuracy(model, fmnist.test.subset(2000), fmnist.info)
    assert acc == pytest.approx(entry["test_accuracy"], abs=0.02)
    # MACs and parameters re-measured exactly.
    assert int(static_cost(model, fmnist.info).total_macs) == entry["macs"]
    assert sum(p.numel() for p in model.parameters()) == entry["params"]
    if entry["architecture"] == "resnet20":
        assert entry["macs"] == RESNET20_MACS


@pytest.mark.slow
@pytest.mark.parametrize("name", _real_names())
def test_real_zoo_full_test_and_val_accuracy(name, fmnist):
    """The full 10000-image test set and the 5000-image validation split reproduce the manifest."""
    entry = _real_entry(name)
    model = load_model(entry["name"], fmnist.info, "zoo")
    assert accuracy(model, fmnist.test, fmnist.info) == pytest.approx(entry["test_accuracy"], abs=5e-4)
    assert accuracy(model, fmnist.val, fmnist.info) == pytest.approx(entry["val_accuracy"], abs=5e-4)
