"""Training the parts of a ``SuperNet`` that a static checkpoint does not provide.

``fit_heads`` trains only the exit heads an arch uses, on a frozen backbone: a linear
probe per exit. Heads pool globally before their linear layer, so the pooled features
are computed once and the probes train on them in seconds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from s2d.data import Batches, DatasetInfo, Split
from s2d.transform.arch import MultiStageArch
from s2d.transform.stages import head_key
from s2d.transform.supernet import SuperNet


@torch.no_grad()
def pooled_exit_features(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *,
                         device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Globally pooled features at the exit of every non-final stage: [(N, c_s)]."""
    heads = [supernet.heads[head_key(s.exit, s.width)] for s in arch.stages[:-1]]
    feats: list[list[torch.Tensor]] = [[] for _ in heads]
    hooks = [h.pool.register_forward_hook(lambda m, i, o, j=j: feats[j].append(o.flatten(1).cpu()))
             for j, h in enumerate(heads)]
    was_training = supernet.training
    supernet.eval()
    try:
        for x, _ in Batches(split, info, 500, device=device):
            supernet.forward_stages(x, arch, upto=len(heads))
    finally:
        for h in hooks:
            h.remove()
        supernet.train(was_training)
    return [torch.cat(f) for f in feats]


def fit_heads(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *, epochs: int = 15,
              lr: float = 1e-2, batch_size: int = 512, seed: int = 0,
              device: str | torch.device = "cpu") -> list[float]:
    """Train the linear layers of the non-final heads of ``arch``; returns each head's final loss."""
    feats = pooled_exit_features(supernet, arch, split, info, device=device)
    labels = split.labels
    losses = []
    g = torch.Generator().manual_seed(seed)
    for s, f in zip(arch.stages[:-1], feats, strict=True):
        fc = supernet.heads[head_key(s.exit, s.width)].fc
        opt = torch.optim.Adam(fc.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * ((len(f) + batch_size - 1) // batch_size)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        loss = torch.tensor(0.0)
        for _ in range(epochs):
            order = torch.randperm(len(f), generator=g)
            for i in range(0, len(f), batch_size):
                idx = order[i:i + batch_size]
                loss = F.cross_entropy(fc(f[idx].to(fc.weight.device)), labels[idx].to(fc.weight.device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        losses.append(loss.item())
    return losses
