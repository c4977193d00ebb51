"""Shared fixtures: the real Fashion-MNIST data and one tiny trained ResNet-20 run.

Tests run single-threaded by default (the machine has 2 cores and may be training; ``make test`` runs
two files at a time with pytest-xdist); set ``S2D_TEST_THREADS`` to use more.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import s2d.measure.network as network
from s2d.allocator import keep_freed_memory
from s2d.data import Dataset, load_dataset
from s2d.models import get_model
from s2d.training.static import TrainConfig, train_static
from s2d.transform.supernet import SuperNet

THREADS = int(os.environ.get("S2D_TEST_THREADS", "1"))
torch.set_num_threads(THREADS)
keep_freed_memory()  # the suite's processes allocate as every CLI command does

# The tiny run every test file shares: 2 epochs on 512 training images.
TINY_CFG = dict(model="resnet20", dataset="fashion-mnist", epochs=2, batch_size=32, optimizer="adamw", lr=3e-3,
                train_limit=512)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory: pytest.TempPathFactory):
    """The suite's own ``$S2D_CACHE`` (unpacked data, the machine's store of stage times), inherited by the CLI's
    subprocesses: a test never reads times another test or a user's run stored, and never writes the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("S2D_CACHE", str(tmp_path_factory.mktemp("s2d-cache")))
        yield


@pytest.fixture(scope="session")
def fmnist() -> Dataset:
    """Fashion-MNIST from the Debian package, default split (55000/5000/10000)."""
    return load_dataset("fashion-mnist")


@pytest.fixture(scope="session")
def quick_data(fmnist: Dataset) -> Dataset:
    """The default split with validation and test cut to 500 images, for fast training/eval."""
    return Dataset(info=fmnist.info, train=fmnist.train, val=fmnist.val.subset(500), test=fmnist.test.subset(500),
                   split_seed=fmnist.split_seed, val_size=fmnist.val_size)


PAIRED_SPEED, MEASURE_SPEED, EXPECTED_LATENCY = network.paired_speed, network.measure_speed, network.expected_latency


def _quick_paired(reference, candidate, inputs, **_):
    return PAIRED_SPEED(reference, candidate, inputs, repeats=2, warmup=0)


def _quick_speed(forward, x, **_):
    return MEASURE_SPEED(forward, x, repeats=2, warmup=0)


def _quick_latency(reference, candidate, images, **_):
    return EXPECTED_LATENCY(reference, candidate, list(images)[:4], repeats=2, warmup=0)


@pytest.fixture(scope="module")
def quick_timing():
    """Report rows timed with 2 repeats and 4 single images, for in-process conversions whose test is about
    something else than speed (what the timing measures is tested in test_timing and test_convert)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(network, "paired_speed", _quick_paired)
        mp.setattr(network, "measure_speed", _quick_speed)
        mp.setattr(network, "expected_latency", _quick_latency)
        yield


def _tiny_config(**overrides) -> TrainConfig:
    return TrainConfig(**{**TINY_CFG, **overrides})


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(**overrides)``: the TrainConfig of the shared tiny run."""
    return _tiny_config


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, quick_data: Dataset) -> dict:
    """An uninterrupted tiny train-base run: {'dir', 'model_pt', 'last_pt', 'final'}."""
    run_dir = tmp_path_factory.mktemp("tiny-run")
    final = train_static(_tiny_config(), run_dir, progress=False, data=quick_data)
    return {
        "dir": Path(run_dir),
        "model_pt": Path(run_dir) / "checkpoints" / "model.pt",
        "last_pt": Path(run_dir) / "checkpoints" / "last.pt",
        "final": final,
    }


def random_resnet20_supernet(head_std: float) -> SuperNet:
    """A random-weight ResNet-20 supernet with non-trivial BN statistics and heads scaled by
    ``head_std``, so that some samples are confident at early exits and others are not."""
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    net = SuperNet(model.eval(), (1, 28, 28), 10).eval()
    with torch.no_grad():
        for h in net.heads.values():
            h.fc.weight.normal_(0, head_std, generator=g)
    return net


@pytest.fixture
def nothing_meets_the_target(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every evaluated arch misses the target (the search finds nothing within tolerance), as it did for the user
    of issue #11 on their own small dataset."""
    from s2d.search.evaluator import ArchEvaluator

    score = ArchEvaluator.score

    def nothing_keeps_it(self, arch, outputs, costs):
        ev = score(self, arch, outputs, costs)
        ev.meets_target = False
        return ev

    monkeypatch.setattr(ArchEvaluator, "score", nothing_keeps_it)
