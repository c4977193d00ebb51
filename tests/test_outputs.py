"""Auxiliary classifiers (GoogLeNet, Inception v3): trained with the model, ignored by the transform engine."""

from __future__ import annotations

import torch

from s2d.checkpoint import load, state_dict_of
from s2d.data import Dataset
from s2d.models import get_model
from s2d.training.outputs import AUX_WEIGHT, aux_loss, split_outputs
from s2d.training.static import TrainConfig, train_static


def test_split_outputs_reads_googlenet_training_output():
    torch.manual_seed(0)
    model = get_model("torchvision:googlenet", 10, 1, image_size=28).train()
    logits, aux = split_outputs(model(torch.randn(2, 1, 28, 28)))
    assert logits.shape == (2, 10) and [a.shape for a in aux] == [(2, 10), (2, 10)]
    y = torch.tensor([1, 2])
    expected = AUX_WEIGHT * sum(torch.nn.functional.cross_entropy(a, y) for a in aux)
    assert torch.allclose(aux_loss(aux, y), expected)
    plain = torch.randn(2, 10)
    assert split_outputs(plain) == (plain, []) and aux_loss([], y) == 0.0


def test_train_base_trains_the_auxiliary_classifiers(tmp_path, quick_data: Dataset):
    """One short epoch of GoogLeNet: its auxiliary classifiers get gradients (their weights move)."""
    torch.manual_seed(0)
    init = get_model("torchvision:googlenet", 10, 1, image_size=28).state_dict()
    cfg = TrainConfig(model="torchvision:googlenet", epochs=1, batch_size=16, optimizer="adamw", lr=1e-3,
                      train_limit=32)
    final = train_static(cfg, tmp_path, progress=False, data=Dataset(
        info=quick_data.info, train=quick_data.train, val=quick_data.val.subset(32), test=quick_data.test.subset(32),
        split_seed=quick_data.split_seed, val_size=quick_data.val_size))
    assert 0.0 <= final["val_acc"] <= 1.0
    trained = state_dict_of(load(tmp_path / "checkpoints" / "model.pt"))
    assert not torch.equal(trained["aux1.fc2.weight"], init["aux1.fc2.weight"])
