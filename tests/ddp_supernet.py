"""A few supernet training steps, run by tests/test_distributed.py as one process or under torchrun.

Usage: python tests/ddp_supernet.py OUT BN STEPS  |  torchrun --nproc-per-node 2 tests/ddp_supernet.py OUT BN STEPS
Writes OUT/initial.pt and OUT/state.pt (rank 0): the supernet's weights before and after training; the
checkpoint OUT/checkpoints/supernet.pt every 2 steps, from which a killed run resumes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from s2d import distributed
from s2d.data import Dataset, load_dataset
from s2d.models import get_model
from s2d.runs import Run
from s2d.search.space import SearchSpace
from s2d.training.supernet import SupernetConfig, train_archs
from s2d.transform.supernet import SuperNet


def main(out: str, bn: str, steps: str) -> None:
    torch.set_num_threads(1)
    world, _ = distributed.init("cpu")
    full = load_dataset("fashion-mnist")
    data = Dataset(info=full.info, train=full.train.subset(2048), val=full.val.subset(128),
                   test=full.test.subset(128), split_seed=full.split_seed, val_size=full.val_size)
    torch.manual_seed(0)
    model = get_model("resnet20", 10, 1)
    supernet = SuperNet(model, (1, 28, 28), 10)
    teacher = get_model("resnet20", 10, 1)
    teacher.load_state_dict(model.state_dict())
    space = SearchSpace(supernet.graph, max_stages=3)
    cfg = SupernetConfig(steps=int(steps), batch_size=32, bn=bn, checkpoint_every=2)
    run = Run(Path(out))
    if world.is_main:
        torch.save(supernet.state_dict(), Path(out) / "initial.pt")
    train_archs(supernet, teacher, data, space.sandwich(), cfg, run, ckpt_name="supernet.pt", tag="supernet",
                progress=False)
    if world.is_main:
        torch.save(supernet.state_dict(), Path(out) / "state.pt")
    distributed.leave()


if __name__ == "__main__":
    main(*sys.argv[1:])
