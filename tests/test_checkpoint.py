"""Checkpoints: atomic save/load, one-line errors, and train-base's resume after a kill."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import s2d.checkpoint
from s2d import checkpoint
from s2d.errors import CheckpointError, RunDirError, S2DError
from s2d.models import get_model
from s2d.training.static import train_static


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg
    return msg


def test_save_atomic_round_trip(tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 1)
    ckpt = checkpoint.model_checkpoint(model, model_name="resnet20", num_classes=10, in_channels=1,
                                       image_size=28, dataset="fashion-mnist", note="x")
    path = tmp_path / "sub" / "model.pt"
    checkpoint.save_atomic(ckpt, path)
    assert os.listdir(tmp_path / "sub") == ["model.pt"]  # no temp file left behind
    loaded = checkpoint.load(path)
    assert (loaded["model"], loaded["num_classes"], loaded["note"]) == ("resnet20", 10, "x")
    assert loaded["format"] == checkpoint.FORMAT
    state = model.state_dict()
    assert loaded["state_dict"].keys() == state.keys()
    assert all(torch.equal(loaded["state_dict"][k], state[k]) for k in state)
    rebuilt = get_model("resnet20", 10, 1, weights=path).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model.eval()(x))
    # A second save replaces the file whole.
    checkpoint.save_atomic({"a": torch.ones(2)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.ones(2))


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    checkpoint.save_atomic({"v": torch.zeros(1)}, path)
    before = path.read_bytes()

    def boom(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(s2d.checkpoint.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_atomic({"v": torch.ones(1)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.pt"]


def test_truncated_checkpoint_is_one_line_error(tiny_run, tmp_path):
    data = tiny_run["model_pt"].read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(bad)
    assert "corrupt or truncated" in _one_line(e) and str(bad) in str(e.value)
    with pytest.raises(CheckpointError):
        get_model("resnet20", 10, 1, weights=bad)


def test_garbage_checkpoint_is_one_line_error(tmp_path):
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(bad)
    assert "corrupt or truncated" in _one_line(e)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError):
        checkpoint.load(empty)


def test_non_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    assert "Tensor" in _one_line(e)


def test_class_count_mismatch_names_keys_and_shapes(tiny_run):
    with pytest.raises(CheckpointError) as e:
        get_model("resnet20", num_classes=100, in_channels=1, weights=tiny_run["model_pt"])
    msg = _one_line(e)
    assert "fc.weight (10, 64) vs (100, 64)" in msg
    assert "fc.bias (10,) vs (100,)" in msg
    assert "2 shape mismatches" in msg


def test_channel_mismatch_names_the_stem(tiny_run):
    with pytest.raises(CheckpointError) as e:
        get_model("resnet20", num_classes=10, in_channels=3, weights=tiny_run["model_pt"])
    assert "conv1.weight (16, 1, 3, 3) vs (16, 3, 3, 3)" in _one_line(e)


def test_deeper_architecture_names_missing_keys(tiny_run):
    state = checkpoint.state_dict_of(checkpoint.load(tiny_run["model_pt"]))
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_into(get_model("resnet32", 10, 1), state, "resnet20.pt")
    msg = _one_line(e)
    assert "missing keys" in msg and "layer1.3." in msg and "unexpected" not in msg
    with pytest.raises(CheckpointError) as e:
        checkpoint.load_into(get_model("resnet20", 10, 1), {**state, "extra.weight": torch.zeros(1)}, "x.pt")
    assert "1 unexpected keys, e.g. extra.weight" in _one_line(e)


def test_checkpoint_of_another_model_is_refused(tiny_run):
    with pytest.raises(CheckpointError) as e:
        get_model("resnet32", 10, 1, weights=tiny_run["model_pt"])
    msg = _one_line(e)
    assert "'resnet20'" in msg and "'resnet32'" in msg and "--model resnet20" in msg


# --- train-base: resume after a kill ------------------------------------------------------------------

def _state(path):
    return checkpoint.state_dict_of(checkpoint.load(path))


def test_tiny_run_learns_and_writes_its_files(tiny_run):
    final = tiny_run["final"]
    assert final["epoch"] == 2
    assert final["val_acc"] > 0.2  # chance is 0.1 (±0.013 on 500 images); this recipe reaches ~0.3
    ckpt = checkpoint.load(tiny_run["model_pt"])
    assert (ckpt["model"], ckpt["dataset"], ckpt["num_classes"], ckpt["in_channels"], ckpt["image_size"]) == (
        "resnet20", "fashion-mnist", 10, 1, 28)
    assert [r["epoch"] for r in ckpt["history"]] == [1, 2]
    assert tiny_run["model_pt"].stat().st_size < 2_000_000  # fp32 state dict only: ~1 MB
    assert list((tiny_run["dir"] / "tensorboard").glob("events.out.tfevents.*"))
    cfg = yaml.safe_load((tiny_run["dir"] / "config.yaml").read_text())
    assert (cfg["model"], cfg["epochs"], cfg["train_limit"], cfg["split_seed"]) == ("resnet20", 2, 512, 0)


def test_killed_run_resumes_where_it_stopped(tiny_config, tmp_path, monkeypatch, quick_data, tiny_run):
    run_dir = tmp_path / "run"
    real_save = s2d.checkpoint.save_atomic
    saves = []

    def save_then_die(obj, path):
        real_save(obj, path)
        saves.append(path.name)
        if path.name == "model.pt":  # both checkpoints of epoch 1 are on disk: kill
            raise KeyboardInterrupt

    monkeypatch.setattr(s2d.checkpoint, "save_atomic", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_static(tiny_config(), run_dir, progress=False, data=quick_data)
    monkeypatch.setattr(s2d.checkpoint, "save_atomic", real_save)
    assert saves == ["last.pt", "model.pt"]
    killed = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert killed["epoch"] == 0 and len(killed["history"]) == 1

    final = train_static(tiny_config(), run_dir, progress=False, data=quick_data)
    last = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    history = last["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert history[0] == killed["history"][0]  # epoch 1 was not redone
    # Resuming is exact: same weights and metrics as the run that was never killed.
    reference = checkpoint.load(tiny_run["last_pt"])["history"]
    for got, want in zip(history, reference, strict=True):
        assert {k: v for k, v in got.items() if k != "img_per_s"} == {
            k: v for k, v in want.items() if k != "img_per_s"}
    assert final["val_acc"] == reference[-1]["val_acc"]
    ref_state, state = _state(tiny_run["model_pt"]), _state(run_dir / "checkpoints" / "model.pt")
    assert all(torch.equal(state[k], ref_state[k]) for k in ref_state)


def test_finished_run_rerun_does_nothing(tiny_config, tiny_run, quick_data):
    files = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in tiny_run["dir"].rglob("*") if p.is_file()}
    config_before = (tiny_run["dir"] / "config.yaml").read_text()
    final = train_static(tiny_config(), tiny_run["dir"], progress=False, data=quick_data)
    assert final == tiny_run["final"]
    for p, (mtime, data) in files.items():
        if p.name != "config.yaml":
            assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data, p
    assert (tiny_run["dir"] / "config.yaml").read_text() == config_before
    assert {p for p in tiny_run["dir"].rglob("*") if p.is_file()} == set(files)  # no new event file


@pytest.mark.parametrize("change", [{"epochs": 3}, {"lr": 0.1}, {"train_limit": 256}, {"seed": 1}])
def test_changed_recipe_is_refused_and_nothing_is_written(tiny_config, tiny_run, quick_data, change):
    config = tiny_run["dir"] / "config.yaml"
    before = config.read_bytes()
    with pytest.raises(S2DError) as e:
        train_static(tiny_config(**change), tiny_run["dir"], progress=False, data=quick_data)
    key = next(iter(change))
    assert (f"--{key}" if key == "epochs" else f"{key}:") in _one_line(e)
    assert config.read_bytes() == before


def test_run_dir_of_another_model_is_refused(tiny_config, tiny_run, quick_data):
    config = tiny_run["dir"] / "config.yaml"
    before = config.read_bytes()
    last = tiny_run["last_pt"].read_bytes()
    with pytest.raises(RunDirError) as e:
        train_static(tiny_config(model="resnet32"), tiny_run["dir"], progress=False, data=quick_data)
    msg = _one_line(e)
    assert "'resnet20' there vs 'resnet32' now" in msg and "--run-dir" in msg
    assert config.read_bytes() == before
    assert tiny_run["last_pt"].read_bytes() == last


def test_unwritable_run_dir_is_one_line(tiny_config, tmp_path, quick_data):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(RunDirError) as e:
        train_static(tiny_config(), blocker / "run", progress=False, data=quick_data)
    assert "not writable" in _one_line(e)
    assert blocker.read_text() == ""


def test_init_weights_starts_training_from_a_checkpoint(tiny_run, tiny_config, quick_data, tmp_path):
    """--init-weights fine-tunes: with a vanishing learning rate the weights stay the checkpoint's."""
    cfg = tiny_config(epochs=1, lr=1e-12, weight_decay=0.0, train_limit=64, init_weights=str(tiny_run["model_pt"]))
    train_static(cfg, tmp_path / "ft", progress=False, data=quick_data)
    start = checkpoint.load(tiny_run["model_pt"])["state_dict"]
    after = checkpoint.load(tmp_path / "ft" / "checkpoints" / "model.pt")["state_dict"]
    conv = "conv1.weight"
    assert torch.allclose(after[conv], start[conv], atol=1e-6)
    fresh = get_model("resnet20", 10, 1).state_dict()[conv]
    assert not torch.allclose(fresh, start[conv], atol=1e-3)
