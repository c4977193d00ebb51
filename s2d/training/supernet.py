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
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from s2d import checkpoint, distributed
from s2d.data import Batches, Dataset
from s2d.errors import S2DError
from s2d.measure.accuracy import stage_logits
from s2d.runs import Run
from s2d.training.distill import distillation_loss
from s2d.training.layout import LAYOUT_NAMES, channels_last_is_safe, faster_layout, time_layouts
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
    probe_images: int = 1000  # validation images the progress probe scores at every checkpoint
    bn: str = "batch"  # "batch": each arch normalises with its own batch statistics; "frozen": the static ones
    largest_weight: float = 2.0  # loss weight of the static network when a sampler draws it with other archs
    last_stage_weight: float = 1.0  # loss weight of an arch's last stage against 1 for each earlier stage


IDENTITY = ("model", "dataset", "weights", "batch_size", "seed", "val_size", "split_seed")


ArchSampler = Callable[[np.random.Generator], list[MultiStageArch]]  # the archs one batch trains


def train_archs(supernet: SuperNet, teacher: torch.nn.Module, data: Dataset, sampler: ArchSampler,
                cfg: SupernetConfig, run: Run, *, ckpt_name: str, tag: str, device: str = "cpu",
                progress: bool = True, probe_archs: list[MultiStageArch] | None = None,
                until: int | None = None) -> dict[str, float]:
    """Fine-tune ``supernet`` on the archs ``sampler`` draws per batch; resumable, logged.

    ``until`` stops (and checkpoints) after that many of the ``cfg.steps`` steps, on their schedule: a later
    call goes on from there as a resumed run does (an arch race trains every candidate that far).

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
    stop = cfg.steps if until is None else min(until, cfg.steps)
    if step >= stop:
        return {}
    world = distributed.current()
    writer = SummaryWriter(str(run.tensorboard / tag), purge_step=step) if world.is_main else None
    batches = Batches(data.train, data.info, cfg.batch_size, shuffle=True, augment=True,
                      seed=cfg.seed * 7919 + step, device=device, shard=world.shard())
    it = iter(batches)
    bar = tqdm(total=cfg.steps, initial=step, desc=tag, disable=not (progress and world.is_main))
    step_loss = StepLoss(supernet, cfg)
    ddp = None
    if world.distributed:  # every sampled arch uses part of the weights (and one head per stage)
        ddp = DistributedDataParallel(step_loss, device_ids=[torch.device(device)] if device.startswith("cuda")
                                      else None, find_unused_parameters=True)

    def save() -> None:
        checkpoint.save_atomic({"state_dict": supernet.state_dict(), "optimizer": opt.state_dict(),
                                "scheduler": sched.state_dict(), "rng": rng.bit_generator.state,
                                "step": step, "steps": cfg.steps}, path)

    stats: dict[str, float] = {}
    seen: set[str] = set()  # archs drawn so far: the second draw of one times its layouts
    try:
        while step < stop:
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(batches)
                x, y = next(it)
            with torch.no_grad():
                target = teacher(x)
            supernet.train(cfg.bn == "batch")  # a probe may have left it in eval mode
            opt.zero_grad(set_to_none=True)
            archs = sampler(rng)  # the same archs on every rank: one seed
            if ddp is None:
                _choose_layouts(supernet, archs, seen, step_loss, x, target, y, writer, tag)
                opt.zero_grad(set_to_none=True)
            if ddp is not None:  # one forward and one backward, so DDP averages the gradients once
                total, outs, losses = ddp(x, target, y, archs, backward=False)
                total.backward()
            else:  # one arch at a time: a single process keeps one arch's activations only
                _, outs, losses = step_loss(x, target, y, archs, backward=True)
            if step % 10 == 0:
                for a in range(len(archs)):
                    name = "arch" if len(archs) == 1 else f"sample{a}"
                    for s, (o, lo) in enumerate(zip(outs[a], losses[a][:-1], strict=True)):
                        scalars = {"loss": distributed.mean(lo.item()),
                                   "acc": distributed.mean((o.argmax(1) == y).float().mean().item())}
                        for k, v in scalars.items():
                            if writer is not None:
                                writer.add_scalar(f"{tag}/{name}_stage{s + 1}_{k}", v, step)
            opt.step()
            sched.step()
            step += 1
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == stop:
                if probe_archs and world.is_main:
                    stats = probe(supernet, probe_archs, data, device=device, images=cfg.probe_images)
                    for k, v in stats.items():
                        writer.add_scalar(f"{tag}/val_{k}", v, step)
                    bar.set_postfix({k: f"{v:.3f}" for k, v in list(stats.items())[:3]})
                if world.is_main:
                    writer.flush()
                    save()
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    distributed.barrier()  # the other ranks read what rank 0 saved
    return stats


def _choose_layouts(supernet: SuperNet, archs: list[MultiStageArch], seen: set[str], step_loss: StepLoss,
                    x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, writer: SummaryWriter | None,
                    tag: str) -> None:
    """Time the training layouts of every arch drawn a second time (the pruned networks of the sandwich, a fine-tuned
    arch: a random arch is rarely drawn twice, and timing it once would cost more than it could save) and let it
    train in the faster one from then on (an arch with narrow convs stays in the default layout untimed:
    ``channels_last_is_safe``). The timed steps leave no trace: gradients are dropped by the caller and the
    batch-norm buffers put back."""
    for arch in archs:
        key = arch.key()
        if key in seen and key not in supernet.training_layouts:
            buffers = {k: v.clone() for k, v in supernet.named_buffers()}

            def step(layout: torch.memory_format, arch: MultiStageArch = arch, key: str = key) -> None:
                supernet.training_layouts[key] = layout
                step_loss(x, target, y, [arch], backward=True)

            safe = channels_last_is_safe(lambda arch=arch: supernet.forward_stages(x, arch, upto=arch.trained_stages))
            seconds = time_layouts(step, device=x.device) if safe else {}
            supernet.training_layouts[key] = faster_layout(seconds)
            with torch.no_grad():
                for k, v in supernet.named_buffers():
                    v.copy_(buffers[k])
            if writer is not None:
                timed = ", ".join(f"{n} {t * 1e3:.0f} ms" for n, t in seconds.items())
                writer.add_text(f"{tag}/layouts", f"{key}: {LAYOUT_NAMES[supernet.training_layouts[key]]} "
                                f"({timed or 'not timed: narrow convs, or not on a single CPU process'})")
        seen.add(key)


class StepLoss(torch.nn.Module):
    """The loss of one training step over the archs drawn for it, as a module's forward: what
    ``DistributedDataParallel`` wraps, so that gradients are averaged across ranks once per step."""

    def __init__(self, supernet: SuperNet, cfg: SupernetConfig) -> None:
        super().__init__()
        self.supernet, self.cfg = supernet, cfg
        self._static_key = static_arch().key()  # the arch a sampler's batch weights by ``largest_weight``

    def forward(self, x: torch.Tensor, target: torch.Tensor, y: torch.Tensor, archs: list[MultiStageArch],
                backward: bool) -> tuple[torch.Tensor, list[list[torch.Tensor]], list[list[torch.Tensor]]]:
        """(total loss, each arch's stage logits, each arch's stage losses then its weighted loss); with
        ``backward`` each arch's loss is back-propagated as soon as it is computed."""
        cfg = self.cfg
        weights = [cfg.largest_weight if arch.key() == self._static_key and len(archs) > 1 else 1.0
                   for arch in archs]
        total, outs, losses = x.new_zeros(()), [], []
        for a, arch in enumerate(archs):
            stage_outs = self.supernet.forward_stages(x, arch, upto=arch.trained_stages)  # a cascade's last is frozen
            stage_losses = [distillation_loss(o, target, y, cfg.distill_temperature, cfg.distill_weight)
                            for o in stage_outs]
            stage_w = [1.0] * (len(stage_losses) - 1) + [cfg.last_stage_weight]
            loss = sum(w * lo for w, lo in zip(stage_w, stage_losses, strict=True)) / sum(stage_w)
            loss = loss * weights[a] / sum(weights)
            if backward:
                loss.backward()
                loss = loss.detach()
            total = total + loss
            outs.append([o.detach() for o in stage_outs])
            losses.append([lo.detach() for lo in stage_losses] + [loss])
        return total, outs, losses


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

