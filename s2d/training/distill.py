"""Knowledge distillation from the static model: the loss every s2d training phase uses, and
:func:`kd_finetune`, the plain distillation of one whole network (a pruned peer for a wall-clock budget,
a cascade's recomputed static stage for a step count)."""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from s2d import checkpoint
from s2d.data import Batches, Dataset
from s2d.errors import CheckpointError, S2DError
from s2d.training.layout import LAYOUT_NAMES, channels_last_is_safe, faster_layout, set_layout, time_layouts
from s2d.training.outputs import aux_loss, split_outputs

FINETUNE_FORMAT = "s2d-kd-finetune-v1"
PROBE_STEPS = 8  # steps run before a wall-clock budget's schedule is sized ...
PROBE_WARMUP = 2  # ... of which the first are not timed (allocator and cache warm-up make them slower) ...
PROBE_FRACTION = 0.02  # ... and at least this share of the budget: six steps timed once at 0.29 s what then ran at
# 0.24 s (Torch-Pruning 1/3, 48-min budget), which planned a schedule that would have ended 8 minutes early
SCHEDULE_MARGIN = 0.97  # plan 3 % fewer steps than the probe predicts: the schedule should end, not be cut


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                      weight: float) -> torch.Tensor:
    """Hinton KD towards the static model's logits, mixed with cross-entropy on the labels."""
    kd = F.kl_div(F.log_softmax(logits / temperature, -1), F.softmax(teacher / temperature, -1),
                  reduction="batchmean") * temperature**2
    return weight * kd + (1 - weight) * F.cross_entropy(logits, labels)


def _cosine_lr(lr: float, step: int, total: int) -> float:
    return 0.5 * lr * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def kd_finetune(student: nn.Module, teacher: nn.Module, data: Dataset, *, seconds: float | None = None,
                steps: int | None = None, batch_size: int = 128,
                lr: float = 0.02, weight_decay: float = 5e-4, temperature: float = 2.0, distill_weight: float = 0.7,
                seed: int = 0, checkpoint_path: str | Path | None = None, checkpoint_every: int = 100,
                metadata: dict[str, Any] | None = None, writer: SummaryWriter | None = None, progress: bool = True,
                device: str | torch.device = "cpu", tag: str = "kd_finetune",
                layout: torch.memory_format | None = None) -> dict[str, float]:
    """Fine-tune ``student`` in place by distillation from ``teacher`` for ``seconds`` of wall-clock time,
    or for a fixed number of ``steps`` (give one): a time budget makes a fair race against a peer, a step
    count makes a network that does not depend on how loaded the machine was.

    SGD with Nesterov momentum and a cosine schedule. The default ``lr`` was picked on the
    validation split (zoo ResNet-20 pruned to 1/4 of the MACs, 60 s: 0.003 92.1 %, 0.01 92.4 %,
    0.02 92.6 %, 0.05 89.0 %, 0.1 85.3 %). The schedule needs a step count, the
    budget is time: the first steps (at least 2 % of the budget) are timed and the schedule is sized
    to the steps the rest of the budget affords (less a small margin, so the cosine ends rather than
    being cut).
    Training stops at the planned step count or at the budget, whichever comes first.

    The student trains in ``layout``, by default the faster memory layout for it on this machine
    (:mod:`s2d.training.layout`: timed on a copy, and the timing counts against ``seconds``); it is handed back in
    the default layout.

    With ``checkpoint_path`` the state is saved atomically right after the schedule is planned,
    every ``checkpoint_every`` steps and at the end; calling again with the same path resumes
    from the last save: the same plan, the step count continued, the training time already
    spent counted against ``seconds``. The student passed on resume must have the saved shapes
    (re-prune it, or rebuild it with :func:`restore_pruned`). ``metadata`` (e.g. the pruning
    ratio) is stored in the checkpoint as is.

    Returns ``steps`` done, ``planned_steps``, training ``seconds`` spent (over all runs),
    ``train_loss`` (mean of the last 50 steps), ``step_seconds`` (probe), ``resumed_from_step`` and
    ``channels_last`` (1.0 when it trained in that layout).
    """
    if (seconds is None) == (steps is None):
        raise S2DError("give the fine-tune a budget: seconds or steps, not both")
    if seconds is not None and not seconds > 0:
        raise S2DError(f"fine-tune budget must be > 0 seconds, got {seconds}")
    if steps is not None and not steps > 0:
        raise S2DError(f"fine-tune budget must be > 0 steps, got {steps}")
    if batch_size < 2:
        raise S2DError(f"batch size must be >= 2 (batch norm trains on batch statistics), got {batch_size}")
    if len(data.train) < batch_size:
        raise S2DError(f"the training split has {len(data.train)} images, fewer than one batch of {batch_size}; "
                       "pass a smaller batch size")
    config = dict(seconds=None if seconds is None else float(seconds), steps=steps, batch_size=batch_size, lr=lr,
                  weight_decay=weight_decay, temperature=temperature, distill_weight=distill_weight, seed=seed)
    device = torch.device(device)
    student.to(device).train()
    teacher.to(device).eval()
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    path = Path(checkpoint_path) if checkpoint_path is not None else None
    step, planned, spent, step_seconds, last_loss = 0, steps or 0, 0.0, float("nan"), float("nan")
    limit = math.inf if seconds is None else seconds
    if path is not None and path.exists():
        state = checkpoint.load(path)
        if state.get("format") != FINETUNE_FORMAT:
            raise CheckpointError(f"{path} is not a KD fine-tune checkpoint; pass another --checkpoint path")
        changed = [f"{k} {state['config'].get(k)} -> {v}" for k, v in config.items() if state["config"].get(k) != v]
        if changed:
            raise CheckpointError(f"{path} was planned with other settings ({'; '.join(changed)}): the schedule "
                                  "depends on them; pass the same settings or delete the checkpoint")
        checkpoint.load_into(student, state["state_dict"], str(path))
        opt.load_state_dict(state["optimizer"])
        step, planned, spent = state["step"], state["planned_steps"], state["seconds_spent"]
        step_seconds, last_loss = state["step_seconds"], state["train_loss"]
    resumed_from = step
    recent: deque[float] = deque(maxlen=50)

    def save() -> None:
        if path is not None:
            checkpoint.save_atomic({
                "format": FINETUNE_FORMAT, "state_dict": student.state_dict(), "optimizer": opt.state_dict(),
                "step": step, "planned_steps": planned, "seconds_spent": spent, "step_seconds": step_seconds,
                "train_loss": sum(recent) / len(recent) if recent else last_loss, "config": config,
                "metadata": metadata or {},
            }, path)

    def result() -> dict[str, float]:
        return {"steps": step, "planned_steps": planned, "seconds": spent,
                "train_loss": sum(recent) / len(recent) if recent else last_loss, "step_seconds": step_seconds,
                "resumed_from_step": resumed_from, "channels_last": float(layout == torch.channels_last)}

    if planned and (step >= planned or spent >= limit):
        return result()
    if layout is None:
        measured = time.perf_counter()
        layout = _faster_student_layout(student, teacher, data, batch_size, temperature, distill_weight, device)
        spent += time.perf_counter() - measured
    set_layout(student, layout)
    if writer is not None:
        writer.add_text(f"{tag}/layout", LAYOUT_NAMES[layout], step)
    batches = Batches(data.train, data.info, batch_size, shuffle=True, augment=True, seed=seed * 7919 + step,
                      device=device)
    it = iter(batches)
    bar = tqdm(total=planned or None, initial=step, desc=tag, disable=not progress, leave=False)
    start, spent_before = time.perf_counter(), spent
    probe_start = None
    try:
        while True:
            x, y = next(it, (None, None))
            if x is None or len(x) < batch_size:  # drop the short last batch: steps stay alike for the plan
                it = iter(batches)
                continue
            for group in opt.param_groups:
                group["lr"] = _cosine_lr(lr, step, planned) if planned else lr
            with torch.no_grad():
                target = teacher(x)
            logits, aux = split_outputs(student(x))
            loss = distillation_loss(logits, target, y, temperature, distill_weight) + aux_loss(aux, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            recent.append(loss.item())
            spent = spent_before + time.perf_counter() - start
            bar.update(1)
            if not planned:  # probing: time the steps after the warm-up, then size the cosine to the budget left
                if step - resumed_from == PROBE_WARMUP:
                    probe_start = time.perf_counter()
                elif (step - resumed_from >= PROBE_STEPS
                      and time.perf_counter() - probe_start >= PROBE_FRACTION * (seconds - spent_before)):
                    step_seconds = (time.perf_counter() - probe_start) / (step - resumed_from - PROBE_WARMUP)
                    planned = step + max(0, int(SCHEDULE_MARGIN * (seconds - spent) / step_seconds))
                    bar.total = planned
                    bar.refresh()
                    save()
            if writer is not None and step % 10 == 0:
                writer.add_scalar(f"{tag}/loss", loss.item(), step)
                writer.add_scalar(f"{tag}/lr", opt.param_groups[0]["lr"], step)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{sum(recent) / len(recent):.3f}")
            if (planned and step >= planned) or spent >= limit:
                break
            if planned and step % checkpoint_every == 0:
                save()
    finally:
        bar.close()
        set_layout(student, torch.contiguous_format)
    planned = planned or step  # the budget ran out while probing
    save()
    if writer is not None:
        writer.flush()
    return result()


def _faster_student_layout(student: nn.Module, teacher: nn.Module, data: Dataset, batch_size: int,
                           temperature: float, distill_weight: float, device: torch.device) -> torch.memory_format:
    """The memory layout in which ``student``'s distillation steps run faster, timed on a copy (its weights,
    batch-norm statistics and the data order of the real run stay untouched)."""
    trial = copy.deepcopy(student).train()
    x, y = next(iter(Batches(data.train, data.info, batch_size, device=device)))
    if not channels_last_is_safe(lambda: trial(x)):
        return torch.contiguous_format
    with torch.no_grad():
        target = teacher(x)

    def step(layout: torch.memory_format) -> None:
        logits, aux = split_outputs(set_layout(trial, layout)(x))
        (distillation_loss(logits, target, y, temperature, distill_weight) + aux_loss(aux, y)).backward()
        trial.zero_grad(set_to_none=True)

    return faster_layout(time_layouts(step, device=device))
