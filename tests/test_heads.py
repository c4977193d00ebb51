"""Exit heads as probes of the static model's features: reproducible, and as good as a probe should be."""

from __future__ import annotations

import pytest
import torch

from s2d import checkpoint
from s2d.data import Batches
from s2d.errors import RunDirError
from s2d.measure.accuracy import stage_outputs
from s2d.models.zoo import load_model
from s2d.pipeline.evaluate import dynamic_from_files
from s2d.runs import open_run
from s2d.training.heads import fit_head, init_heads
from s2d.transform.arch import MultiStageArch
from s2d.transform.sliced import ExitHead
from s2d.transform.stages import head_key
from s2d.transform.supernet import SuperNet, dynamic_checkpoint


def _probed(fmnist, rng_seed: int, head_hidden: int = 0) -> SuperNet:
    torch.manual_seed(rng_seed)  # the heads' construction draws from the global RNG
    sn = SuperNet(load_model("resnet20", fmnist.info, "zoo"), (1, 28, 28), 10, head_hidden=head_hidden).eval()
    init_heads(sn, fmnist.train.subset(2000), fmnist.info, widths=(1.0,), epochs=3)
    return sn


def _early_exit_arch(sn: SuperNet, k: int) -> MultiStageArch:
    """A full-width stage exiting at the ``k``-th exit, then the static network."""
    return MultiStageArch.from_dict({"stages": [{"width": 1.0, "exit": sn.graph.exits[k].name},
                                                {"width": 1.0, "exit": "output"}]})


def test_probes_do_not_depend_on_the_global_rng(fmnist):
    """A report re-run on a finished conversion must rebuild the same full-width heads (its depth-only row and
    fallback read them): before, two runs' depth-only rows of one conversion differed by 8 % of the static MACs."""
    a, b = _probed(fmnist, 0), _probed(fmnist, 1)
    probed = [head_key(e.name, 1.0) for e in a.graph.exits if head_key(e.name, 1.0) in a.heads]
    assert probed
    for key in probed:
        torch.testing.assert_close(a.heads[key].fc.weight, b.heads[key].fc.weight, atol=0, rtol=0)
        torch.testing.assert_close(a.heads[key].fc.bias, b.heads[key].fc.bias, atol=0, rtol=0)
    # a probe of the second-last exit's features (the last block still to come) is nearly as good as the network
    exit_name = a.graph.exits[-2].name
    arch = MultiStageArch.from_dict({"stages": [{"width": 1.0, "exit": exit_name}, {"width": 1.0, "exit": "output"}]})
    outs = stage_outputs(a, arch, fmnist.val.subset(1000), fmnist.info)
    probe, static = outs.stage_accuracy()
    assert probe > 0.85 and static > 0.9


def test_hidden_heads_are_reproducible_and_beat_linear_probes(fmnist):
    """Full-width heads read frozen static features; a hidden layer gets more out of them than a linear probe,
    most where the features are least linear (ResNet-20's first sections), and is as reproducible."""
    a, b = _probed(fmnist, 0, head_hidden=64), _probed(fmnist, 1, head_hidden=64)
    for key in [head_key(e.name, 1.0) for e in a.graph.exits if head_key(e.name, 1.0) in a.heads]:
        assert a.heads[key].hidden is not None
        for p, q in zip(a.heads[key].parameters(), b.heads[key].parameters(), strict=True):
            torch.testing.assert_close(p, q, atol=0, rtol=0)
    assert all(h.hidden is None for k, h in a.heads.items() if not k.endswith(head_key("", 1.0)))  # narrow: linear
    linear = _probed(fmnist, 0)
    val = fmnist.val.subset(1000)
    for k in (0, 2):
        arch = _early_exit_arch(a, k)
        hidden_acc = stage_outputs(a, arch, val, fmnist.info).stage_accuracy()[0]
        linear_acc = stage_outputs(linear, arch, val, fmnist.info).stage_accuracy()[0]
        assert hidden_acc > linear_acc + 0.05  # measured: 0.74 / 0.63, 0.77 / 0.70, (k, hidden_acc, linear_acc)


def test_hidden_head_reads_raw_features_of_any_scale():
    """The hidden layer trains on standardised features and folds the standardisation into its weights: features
    a million times apart in scale, whose classes no linear probe separates (XOR of their signs), come out right."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 2, generator=g) * torch.tensor([1e3, 1e-3])
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    heads = {h: ExitHead(2, 2, hidden=h) for h in (0, 32)}
    for head in heads.values():
        fit_head(head, x, y, epochs=20, lr=1e-2, batch_size=256, generator=torch.Generator().manual_seed(1),
                 fresh=True)
    with torch.no_grad():
        acc = {h: (head(x[:, :, None, None]).argmax(-1) == y).float().mean().item() for h, head in heads.items()}
    assert acc[32] > 0.95 and acc[0] < 0.7, acc


def test_a_dynamic_checkpoint_from_before_hidden_heads_still_loads(fmnist, tmp_path):
    """Checkpoints written before ``head_hidden`` was recorded had linear heads: they rebuild as such, with the
    same outputs, and a current checkpoint records the heads it has."""
    sn = _probed(fmnist, 0)
    arch = _early_exit_arch(sn, 1).with_thresholds([0.9])
    ckpt = dynamic_checkpoint(sn, arch, {"model": "resnet20", "num_classes": 10, "in_channels": 1, "image_size": 28})
    assert ckpt.pop("head_hidden") == 0
    path = tmp_path / "dynamic.pt"
    checkpoint.save_atomic(ckpt, path)
    loaded, loaded_arch = dynamic_from_files(fmnist, str(path), model_name="resnet20", arch=None, tolerance=0.5)
    assert loaded.head_hidden == 0
    x, _ = next(iter(Batches(fmnist.val.subset(64), fmnist.info, 64)))
    for ours, theirs in zip(sn.eval().forward_stages(x, arch), loaded.forward_stages(x, loaded_arch), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_a_run_from_before_a_setting_keeps_what_it_was_made_with(tmp_path):
    """A run directory whose config predates an identity key was made with the key's legacy value: reopening it
    with that value resumes it, with another is refused like any other clash."""
    open_run(tmp_path, {"model": "resnet20"}, identity=("model", "exit_head"))  # written before the key existed
    open_run(tmp_path, {"model": "resnet20", "exit_head": "linear"}, identity=("model", "exit_head"),
             legacy={"exit_head": "linear"})
    (tmp_path / "config.yaml").write_text("model: resnet20\n")
    with pytest.raises(RunDirError, match="exit_head: 'linear' there vs 'mlp' now"):
        open_run(tmp_path, {"model": "resnet20", "exit_head": "mlp"}, identity=("model", "exit_head"),
                 legacy={"exit_head": "linear"})
