"""Exit heads on a frozen backbone: probes of the features at each exit.

Heads pool to a small grid before their layers, so the pooled features are computed
once and the probes train on them in seconds.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from s2d.data import Batches, Dataset, DatasetInfo, Split
from s2d.transform.arch import MultiStageArch
from s2d.transform.sliced import ExitHead, head_pool
from s2d.transform.stages import head_key, reads_tail, stage_head_key
from s2d.transform.supernet import SuperNet

HEAD_EPOCHS = 15  # epochs of the heads a network ships (a supernet's starting probes take fewer)


def exit_heads(supernet: SuperNet, arch: MultiStageArch) -> list[tuple[int, ExitHead]]:
    """(stage index, head) of every non-final stage that has an exit head (not the static model's tail)."""
    return [(i, supernet.heads[stage_head_key(supernet.graph, s.exit, s.width)])
            for i, s in enumerate(arch.stages[:-1]) if not reads_tail(supernet.graph, s.exit, s.width)]


@torch.no_grad()
def pooled_exit_features(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *,
                         device: str | torch.device = "cpu") -> list[torch.Tensor]:
    """Pooled features (what the linear layer reads) at the exit of every non-final stage with a head of its
    own (:func:`exit_heads`): [(N, c_s)]."""
    found = exit_heads(supernet, arch)
    heads = [h for _, h in found]
    upto = found[-1][0] + 1 if found else 0
    supernet.ensure_statistics(arch)  # before the hooks: estimating them runs forwards of its own
    feats: list[list[torch.Tensor]] = [[] for _ in heads]
    hooks = [h.pool.register_forward_hook(lambda m, i, o, j=j: feats[j].append(o.flatten(1).cpu()))
             for j, h in enumerate(heads)]
    was_training = supernet.training
    supernet.eval()
    try:
        for x, _ in Batches(split, info, 500, device=device):
            supernet.forward_stages(x, arch, upto=upto)
    finally:
        for h in hooks:
            h.remove()
        supernet.train(was_training)
    return [torch.cat(f) for f in feats]


def _fit(module: torch.nn.Module, feats: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
         batch_size: int, generator: torch.Generator) -> float:
    """Adam with cosine decay on (pooled features, labels); returns the last batch loss."""
    dev = next(module.parameters()).device
    opt = torch.optim.Adam(module.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(feats) + batch_size - 1) // batch_size))
    loss = torch.tensor(0.0)
    for _ in range(epochs):
        order = torch.randperm(len(feats), generator=generator)
        for i in range(0, len(feats), batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(module(feats[idx].to(dev)), labels[idx].to(dev))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return loss.item()


@torch.no_grad()
def _fit_hidden(head: ExitHead, feats: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
                batch_size: int, generator: torch.Generator) -> float:
    """Fit a head with a hidden layer from a fresh start drawn from ``generator``, on standardised features
    (the pooled features of a frozen backbone differ in scale by an order of magnitude and more, which a ReLU layer
    trained with one learning rate does not absorb as a linear probe does); the standardisation is folded into the
    hidden layer afterwards, so the head reads the raw features as any other."""
    first = head.hidden[0]
    for layer in (first, head.fc):
        torch.nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(layer.weight.shape[1])
        torch.nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    mean, std = feats.mean(0), feats.std(0).clamp_min(1e-6)
    with torch.enable_grad():
        loss = _fit(torch.nn.Sequential(head.hidden, head.fc), (feats - mean) / std, labels, epochs=epochs, lr=lr,
                    batch_size=batch_size, generator=generator)
    first.weight.div_(std.to(first.weight.device))
    first.bias.sub_(first.weight @ mean.to(first.weight.device))
    return loss


def fit_head(head: ExitHead, feats: torch.Tensor, labels: torch.Tensor, *, epochs: int, lr: float,
             batch_size: int, generator: torch.Generator, fresh: bool = False) -> float:
    """Fit ``head``'s layers on its pooled input features: a linear probe goes on from its weights (from zero
    with ``fresh``), a head with a hidden layer always starts afresh; returns the last batch loss."""
    if head.hidden is not None:
        return _fit_hidden(head, feats, labels, epochs=epochs, lr=lr, batch_size=batch_size, generator=generator)
    if fresh:  # a convex fit from a fixed start: the probe does not depend on the global RNG
        with torch.no_grad():
            head.fc.weight.zero_()
            head.fc.bias.zero_()
    with torch.enable_grad():
        return _fit(head.fc, feats, labels, epochs=epochs, lr=lr, batch_size=batch_size, generator=generator)


def fit_heads(supernet: SuperNet, arch: MultiStageArch, split: Split, info: DatasetInfo, *, epochs: int = HEAD_EPOCHS,
              lr: float = 1e-2, batch_size: int = 512, seed: int = 0,
              device: str | torch.device = "cpu") -> list[float]:
    """Train the non-final heads of ``arch`` on its frozen features; returns each head's final loss."""
    feats = pooled_exit_features(supernet, arch, split, info, device=device)
    g = torch.Generator().manual_seed(seed)
    return [fit_head(h, f, split.labels, epochs=epochs, lr=lr, batch_size=batch_size, generator=g)
            for (_, h), f in zip(exit_heads(supernet, arch), feats, strict=True)]


@torch.no_grad()
def init_heads(supernet: SuperNet, split: Split, info: DatasetInfo, *, epochs: int = 10, lr: float = 1e-2,
               batch_size: int = 512, seed: int = 0, device: str | torch.device = "cpu",
               widths: tuple[float, ...] | None = None) -> int:
    """Start every exit head as a probe of the static model's features at its exit.

    One pass of the static trunk gives every exit's features; a head of width w reads the
    first c_w(C) channels of them. Far better than random heads as a starting point for
    supernet training; returns the number of heads fitted.
    """
    graph = supernet.graph
    trunk = graph.truncated(*(e.node for e in graph.exits)).to(device).eval()
    pools = [head_pool(e.spatial) for e in graph.exits]
    pooled: list[list[torch.Tensor]] = [[] for _ in graph.exits]
    for x, _ in Batches(split, info, 500, device=device):
        outs = trunk(x)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for j, o in enumerate(outs):
            pooled[j].append(pools[j](o).cpu())  # (N, C, cells): a width-w head reads the first c_w(C) channels
    g = torch.Generator().manual_seed(seed)
    fitted = 0
    for e, chunks in zip(graph.exits, pooled, strict=True):
        feats = torch.cat(chunks)
        for w in widths or supernet.widths:
            key = head_key(e.name, w)
            if key in supernet.heads:
                fit_head(supernet.heads[key], feats[:, e.owned(w)].flatten(1), split.labels, epochs=epochs, lr=lr,
                         batch_size=batch_size, generator=g, fresh=True)
                fitted += 1
    return fitted


def prepare_arch(supernet: SuperNet, arch: MultiStageArch, data: Dataset, *, device: str | torch.device = "cpu",
                 head_images: int = 20000, recalibrate: bool = True) -> None:
    """Make an arch of an untrained supernet usable: BN statistics for it, and trained exit heads."""
    if arch.num_stages == 1:
        return
    if recalibrate and not arch.is_full_width:  # full-width archs compute the static network
        train = Batches(data.train, data.info, 256, shuffle=True, seed=1, device=device)
        supernet.recalibrate_bn(arch, train, num_batches=20)
    fit_heads(supernet, arch, data.train.subset(head_images), data.info, device=device)
