"""Training a ``SuperNet``'s shared weights on archs drawn per batch.

``train_archs`` fine-tunes the shared weights on the archs a sampler draws per batch: the
sandwich rule (pruned networks and random archs) for the supernet, or one fixed arch for the final
fine-tune, with distillation from the static model's logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from s2d import checkpoint
from s2d.data import Batches, Dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import stage_logits
from s2d.runs import Run
from s2d.training.distill import distillation_loss
from s2d.transform.arch import MultiStageArch, static_arch
from s2d.transform.supernet import SuperNet


@dataclass
class SupernetConfig:
    """How the supernet (or one arch) is fine-tuned; the identity of a supernet run."""

    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    weights: str = "zoo"
    steps: int = 300
    batch_size: int = 128
    lr: float = 0.01  # backbone; heads use head_lr (0.005 kept narrow archs ~4 points lower after 300 steps)
    head_lr: float = 0.05
    weight_decay: float = 5e-5
    distill_temperature: float = 2.0
    distill_weight: float = 0.7
    seed: int = 0
    val_size: int | None = None  # None: 10 % of the training images, at most 5000 (resolved on load)
    split_seed: int = 0
    checkpoint_every: int = 50
    bn: str = "batch"  # "batch": each arch normalises with its own batch statistics; "frozen": the static ones
    largest_weight: float = 2.0  # loss weight of the static network when a sampler draws it with other archs
    last_stage_weight: float = 1.0  # loss weight of an arch's last stage against 1 for each earlier stage


IDENTITY = ("model", "dataset", "weights", "batch_size", "seed", "val_size", "split_seed")


ArchSampler = Callable[[np.random.Generator], list[MultiStageArch]]  # the archs one batch trains


def train_archs(supernet: SuperNet, teacher: torch.nn.Module, data: Dataset, sampler: ArchSampler,
                cfg: SupernetConfig, run: Run, *, ckpt_name: str, tag: str, device: str = "cpu",
                progress: bool = True, probe_archs: list[MultiStageArch] | None = None) -> dict[str, float]:
    """Fine-tune ``supernet`` on the archs ``sampler`` draws per batch; resumable, logged.

    With ``cfg.bn == "batch"`` every arch trains with its own batch statistics (an arch
    with narrow early stages drops weight blocks, so its activations have other statistics
    than the static network's); evaluation then needs per-arch statistics
    (``SuperNet.use_arch_statistics``). ``"frozen"`` keeps the static statistics for every
    arch (modules stay in eval mode) and lets the weights adapt to them.
    """
    if cfg.bn not in ("batch", "frozen"):
        raise S2DError(f"unknown batch-norm mode {cfg.bn!r}; valid: batch, frozen")
    supernet.to(device).train(cfg.bn == "batch")
    teacher.to(device).eval()
    backbone = [p for n, p in supernet.named_parameters() if not n.startswith("heads.") and p.requires_grad]
    opt = torch.optim.SGD([{"params": backbone, "lr": cfg.lr},
                           {"params": supernet.heads.parameters(), "lr": cfg.head_lr}],
                          momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    warmup = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then cosine decay
        opt, lambda i: min(1.0, (i + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(i, cfg.steps) / cfg.steps)))
    rng = np.random.default_rng(cfg.seed)
    path = run.checkpoints / ckpt_name
    step = 0
    if path.exists():
        state = checkpoint.load(path)
        if state.get("steps") != cfg.steps:
            raise S2DError(f"{path} was trained for {state.get('steps')} steps, not {cfg.steps}; pass the same "
                           "budget or a new --run-dir")
        checkpoint.load_into(supernet, state["state_dict"], str(path))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        step = state["step"]
    if step >= cfg.steps:
        return {}
    writer = SummaryWriter(str(run.tensorboard / tag), purge_step=step)
    batches = Batches(data.train, data.info, cfg.batch_size, shuffle=True, augment=True,
                      seed=cfg.seed * 7919 + step, device=device)
    it = iter(batches)
    bar = tqdm(total=cfg.steps, initial=step, desc=tag, disable=not progress)

    def save() -> None:
        checkpoint.save_atomic({"state_dict": supernet.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "rng": rng.bit_generator.state,
                                "step": step, "steps": cfg.steps}, path)

    stats: dict[str, float] = {}
    static_key = static_arch().key()  # the arch a sampler's batch weights by ``largest_weight``
    try:
        while step < cfg.steps:
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(batches)
                x, y = next(it)
            with torch.no_grad():
                target = teacher(x)
            supernet.train(cfg.bn == "batch")  # a probe may have left it in eval mode
            opt.zero_grad(set_to_none=True)
            archs = sampler(rng)
            weights = [cfg.largest_weight if arch.key() == static_key and len(archs) > 1 else 1.0 for arch in archs]
            for a, arch in enumerate(archs):
                outs = supernet.forward_stages(x, arch, upto=arch.trained_stages)  # a cascade's last is frozen
                losses = [distillation_loss(o, target, y, cfg.distill_temperature, cfg.distill_weight)
                          for o in outs]
                stage_w = [1.0] * (len(losses) - 1) + [cfg.last_stage_weight]
                loss = sum(w * lo for w, lo in zip(stage_w, losses, strict=True)) / sum(stage_w)
                (loss * weights[a] / sum(weights)).backward()
                if step % 10 == 0:
                    name = "arch" if len(archs) == 1 else f"sample{a}"
                    for s, (o, lo) in enumerate(zip(outs, losses, strict=True)):
                        writer.add_scalar(f"{tag}/{name}_stage{s + 1}_loss", lo.item(), step)
                        writer.add_scalar(f"{tag}/{name}_stage{s + 1}_acc", (o.argmax(1) == y).float().mean().item(),
                                          step)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                if probe_archs:
                    stats = probe(supernet, probe_archs, data, device=device)
                    for k, v in stats.items():
                        writer.add_scalar(f"{tag}/val_{k}", v, step)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in list(stats.items())[:3]})
                writer.flush()
                save()
    finally:
        bar.close()
        writer.close()
    return stats


@torch.no_grad()
def probe(supernet: SuperNet, archs: list[MultiStageArch], data: Dataset, *, device: str = "cpu",
          images: int = 1000) -> dict[str, float]:
    """Validation accuracy of every stage of a few fixed archs (a cheap progress signal)."""
    supernet.eval()  # eval-mode statistics (per arch, when the supernet has a source for them)
    out = {}
    val = data.val.subset(images)
    for i, arch in enumerate(archs):
        logits = stage_logits(lambda x, a=arch: supernet.forward_stages(x, a), val, data.info, device=device)
        acc = (logits.argmax(-1) == val.labels[None]).float().mean(1)
        for s, v in enumerate(acc.tolist()):
            out[f"arch{i}_stage{s + 1}"] = v
    return out

