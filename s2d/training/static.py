"""``s2d train-base``: train a static model with a standard recipe.

Recipe (measured in shared/design.md): SGD with Nesterov momentum, one-cycle
schedule, weight decay 5e-4, random crop + flip; 10 epochs give ResNet-20
~93.4 % on Fashion-MNIST. Checkpoints are written atomically at the end of every
epoch; running the same command again resumes from the last one.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from s2d import checkpoint, distributed
from s2d.data import Batches, Dataset, Split, load_dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import accuracy
from s2d.models import get_model
from s2d.runs import open_run
from s2d.training.outputs import aux_loss, split_outputs


@dataclass
class TrainConfig:
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "onecycle"  # onecycle | cosine
    label_smoothing: float = 0.0
    seed: int = 0
    val_size: int | None = None  # None: 10 % of the training images, at most 5000 (resolved on load)
    split_seed: int = 0
    train_limit: int | None = None  # train on the first N samples only (smoke tests)
    data_dir: str | None = None
    init_weights: str | None = None  # start from this checkpoint (fine-tuning) instead of random init
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.epochs < 1:
            raise S2DError(f"--epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise S2DError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise S2DError(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adamw"):
            raise S2DError(f"--optimizer must be sgd or adamw, got {self.optimizer!r}")
        if self.schedule not in ("onecycle", "cosine"):
            raise S2DError(f"--schedule must be onecycle or cosine, got {self.schedule!r}")
        if not 0 <= self.label_smoothing < 1:
            raise S2DError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")


# Keys a resumed run must share with the run on disk: the optimizer and schedule state in
# last.pt were built from them (a different --lr or --train-limit would be silently ignored
# or break the schedule's step count).
IDENTITY = ("model", "dataset", "seed", "val_size", "split_seed", "optimizer", "schedule", "batch_size",
            "lr", "momentum", "weight_decay", "label_smoothing", "train_limit", "init_weights")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.25)
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)


def train_static(cfg: TrainConfig, run_dir: str | Path, *, progress: bool = True,
                 data: Dataset | None = None) -> dict[str, Any]:
    """Train (or resume training) and return the final metrics."""
    cfg.validate()
    data = data or load_dataset(cfg.dataset, data_dir=cfg.data_dir, val_size=cfg.val_size, split_seed=cfg.split_seed)
    cfg.val_size = data.val_size  # the resolved default is part of the run's identity
    info = data.info
    last = Path(run_dir) / "checkpoints" / "last.pt"
    state = checkpoint.load(last) if last.exists() else None
    if state is not None and state.get("epochs") != cfg.epochs:  # checked before config.yaml is rewritten
        raise S2DError(
            f"{last} was trained for {state.get('epochs')} epochs, not {cfg.epochs}: the schedule "
            "depends on it; pass the same --epochs or a new --run-dir"
        )
    run = open_run(run_dir, {"command": "train-base", **asdict(cfg)}, identity=IDENTITY)
    device = torch.device(cfg.device)
    seed_everything(cfg.seed)
    model = get_model(cfg.model, info.num_classes, info.in_channels, cfg.init_weights,
                      image_size=info.image_size).to(device)
    train: Split = data.train.subset(cfg.train_limit)
    steps = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    opt = make_optimizer(model.parameters(), cfg)
    sched = make_scheduler(opt, cfg, steps)
    start_epoch, history = 0, []
    if state is not None:
        checkpoint.load_into(model, state["model_state"], str(last))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        if start_epoch >= cfg.epochs:
            return history[-1]
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    world = distributed.current()
    # Under torchrun: each rank trains on its rows of every global batch; DDP averages the gradients (and
    # broadcasts rank 0's weights at the start); rank 0 writes logs and checkpoints.
    trained = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if world.distributed else model
    writer = SummaryWriter(str(run.tensorboard), purge_step=start_epoch * steps) if world.is_main else None
    meta = dict(model_name=cfg.model, num_classes=info.num_classes, in_channels=info.in_channels,
                image_size=info.image_size, dataset=cfg.dataset)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            batches = Batches(train, info, cfg.batch_size, shuffle=True, augment=True,
                              seed=cfg.seed * 1000 + epoch, device=device, shard=world.shard())
            bar = tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and world.is_main),
                       leave=False)
            t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
            for i, (x, y) in enumerate(bar):
                out, aux = split_outputs(trained(x))
                loss = loss_fn(out, y) + aux_loss(aux, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                seen += len(y)
                correct += (out.argmax(1) == y).sum().item()
                loss_sum += loss.item() * len(y)
                step = epoch * steps + i
                if i % 20 == 0 and writer is not None:
                    writer.add_scalar("train/loss", loss.item(), step)
                    writer.add_scalar("train/lr", sched.get_last_lr()[0], step)
                    bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{correct / seen:.3f}")
            val_acc = accuracy(model, data.val, info, device=device)
            record = {
                "epoch": epoch + 1,
                "train_loss": distributed.mean(loss_sum / seen, device),
                "train_acc": distributed.mean(correct / seen, device),
                "val_acc": val_acc,
                "img_per_s": seen * world.size / (time.perf_counter() - t0),
            }
            history.append(record)
            if writer is None:
                continue
            writer.add_scalar("train/epoch_loss", record["train_loss"], epoch + 1)
            writer.add_scalar("train/accuracy", record["train_acc"], epoch + 1)
            writer.add_scalar("val/accuracy", val_acc, epoch + 1)
            writer.flush()
            checkpoint.save_atomic({
                "model_state": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "epoch": epoch, "epochs": cfg.epochs, "history": history,
            }, last)
            checkpoint.save_atomic(checkpoint.model_checkpoint(model, **meta, history=history),
                                   run.checkpoints / "model.pt")
            if progress:
                tqdm.write(f"epoch {epoch + 1}/{cfg.epochs}: loss {record['train_loss']:.4f} "
                           f"train {record['train_acc']:.4f} val {val_acc:.4f} ({record['img_per_s']:.0f} img/s)")
    finally:
        if writer is not None:
            writer.close()
    distributed.barrier()  # the other ranks may read what rank 0 saved
    return history[-1]
