"""Commands of the transform engine: ``s2d exits``, ``s2d doctor`` and ``s2d export``."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from s2d.cli.args import (
    add_data_args,
    add_model_args,
    add_runtime_args,
    check_device,
    float_in,
    load_data,
    positive_int,
)
from s2d.errors import S2DError


def cmd_exits(args: argparse.Namespace) -> int:
    from s2d.measure.cost import exit_macs
    from s2d.transform.graph import analyze

    model, shape = _model_and_shape(args)
    graph = analyze(model, shape)
    macs = exit_macs(graph, shape)
    rows = [{"exit": e.name, "node": e.node, "channels": e.channels, "resolution": list(e.spatial),
             "section": e.section, "cumulative_macs": m, "fraction_of_static": m / macs[-1]}
            for e, m in zip(graph.exits, macs, strict=True)]
    if args.json:
        print(json.dumps({"model": args.model, "input": list(shape), "num_sections": graph.num_sections,
                          "exits": rows}, indent=2))
        return 0
    print(f"{'exit':<16}{'channels':>9}{'res':>7}{'section':>8}{'cum. MACs':>12}{'of static':>11}")
    for r in rows:
        print(f"{r['exit']:<16}{r['channels']:>9}{r['resolution'][0]:>5}px{r['section']:>8}"
              f"{r['cumulative_macs'] / 1e6:>11.2f}M{r['fraction_of_static'] * 100:>10.1f}%")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from s2d.transform.doctor import diagnose

    model, shape = _model_and_shape(args)
    d = diagnose(model, shape)
    if args.json:
        print(json.dumps({"model": args.model, "input": list(shape), **d.to_dict()}, indent=2))
        return 0
    exact = "exact" if d.one_stage_error <= 1e-4 else "NOT EXACT, please report this"
    print(f"{args.model} on {shape[0]}x{shape[1]}x{shape[2]} inputs: converts; one-stage arch reproduces the "
          f"static logits to {d.one_stage_error:.1e} (relative, {exact})")
    print(f"exits ({len(d.exits)}): {', '.join(d.exits)}")
    kind = "depth-only stages (no conv splits)" if d.depth_only else "width and depth splits"
    print(f"convs that split along channels: {d.split_convs} of {d.convs} -> {kind}")
    if d.grouped_units:
        units = Counter(d.grouped_units.values())
        print("grouped convs split between whole groups: "
              + ", ".join(f"{n} conv(s) in {u} units" for u, n in sorted(units.items())))
    if d.whole_ops:
        print(f"ops kept whole ({len(d.whole_ops)}), with every tensor tied to them channel by channel:")
        for why, n in d.reasons().most_common():
            where = sorted({w.module or w.node for w in d.whole_ops if w.why == why})
            shown = ", ".join(where[:4]) + (f", ... ({len(where) - 4} more)" if len(where) > 4 else "")
            print(f"  {n:4d} x {why}: {shown}")
        if d.whole_convs:
            print(f"  convs kept at full width because of them: {len(d.whole_convs)}")
    return 0 if d.one_stage_error <= 1e-4 else 1


def cmd_export(args: argparse.Namespace) -> int:
    from s2d.data import Batches
    from s2d.pipeline.evaluate import dynamic_from_files
    from s2d.transform.arch import MultiStageArch
    from s2d.transform.export import ExportedDynamicNet, export

    arch = MultiStageArch.load(args.arch) if args.arch else None
    data = load_data(args)
    supernet, arch = dynamic_from_files(data, args.weights, model_name=args.model, arch=arch,
                                        tolerance=args.tolerance / 100, device=check_device(args.device))
    supernet.cpu()
    net = supernet.materialise(arch)
    meta = export(net, supernet.input_shape, args.out, args.format)
    # Check: the exported files reproduce DynamicNet on real test images.
    x = next(iter(Batches(data.test.subset(256), data.info, 256)))[0]
    ref_logits, ref_exit = net(x)
    got_logits, got_exit = ExportedDynamicNet(args.out)(x)
    diff = (ref_logits - got_logits).abs().max().item()
    same_exit = (ref_exit == got_exit).float().mean().item()
    print(f"exported {len(meta['stages'])} stages ({args.format}) to {args.out}; on 256 test images: "
          f"max |logit diff| {diff:.2e}, same exit stage for {same_exit * 100:.1f} %")
    if diff > 1e-3 or same_exit < 0.99:
        raise S2DError(f"exported stages disagree with DynamicNet (max diff {diff:.2e}); please report this")
    if args.speed:
        _export_speed(args, data, supernet, net)
    return 0


def _export_speed(args: argparse.Namespace, data, supernet, net) -> None:
    """Where users deploy: the exported stages with early exit against the static network exported the same
    way, and the same pair in PyTorch, each timed paired on real test images (``OUT/speed.json``)."""
    import torch

    from s2d.measure.network import paired_figures
    from s2d.runs import write_json_atomic
    from s2d.transform.arch import static_arch
    from s2d.transform.export import ExportedDynamicNet, export

    static = supernet.materialise(static_arch())  # the static network's shape, batch norm folded
    export(static, supernet.input_shape, Path(args.out) / "static", args.format)
    runtime = "onnxruntime" if args.format == "onnx" else "torchscript"
    pairs = {"pytorch": (static, net),
             runtime: (ExportedDynamicNet(Path(args.out) / "static"), ExportedDynamicNet(args.out))}
    figures = {name: paired_figures(ref, cand, data.test, data.info, latency_images=args.latency_images)
               for name, (ref, cand) in pairs.items()}
    write_json_atomic(Path(args.out) / "speed.json", {"threads": torch.get_num_threads(), **figures})
    print("runtime | batch-1 latency ms (static) | ratio | batch-256 img/s (static) | ratio")
    for name, f in figures.items():
        print(f"{name} | {f['latency_ms_batch1']:.3f} ({f['static_latency_ms_batch1']:.3f}) | "
              f"{f['latency_ratio']:.2f} | {f['throughput_img_s_batch256']:.0f} "
              f"({f['static_throughput_img_s_batch256']:.0f}) | {f['throughput_ratio']:.2f}")


def _inspection_args(p: argparse.ArgumentParser, weights_default: str) -> None:
    """Flags of the commands that look at a model without data beyond its input shape."""
    add_model_args(p, weights_default=weights_default)
    p.add_argument("--dataset", default="fashion-mnist", help="sets the input shape (and the zoo weights)")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true")
    add_runtime_args(p)
    p.add_argument("--json", action="store_true")


def _model_and_shape(args: argparse.Namespace):
    from s2d.data import load_dataset
    from s2d.models.zoo import load_model

    info = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download).info
    return load_model(args.model, info, args.weights), (info.in_channels, info.image_size, info.image_size)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exits", help="list a model's exit points with their cumulative static MACs")
    _inspection_args(p, weights_default="zoo")
    p.set_defaults(func=cmd_exits)

    p = sub.add_parser("doctor", help="what converting a model would split: exits, splittable convs, ops kept "
                                      "whole and where, one-stage exactness")
    _inspection_args(p, weights_default="none")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("export", help="export a dynamic network, one file per stage (TorchScript or ONNX)")
    add_model_args(p)
    add_data_args(p)
    add_runtime_args(p)
    p.add_argument("--arch", help="MultiStageArch JSON (optional with a dynamic checkpoint as --weights)")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="onnx")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tolerance", type=float_in(0, 100), default=0.5,
                   help="accuracy points below static allowed when calibrating missing thresholds")
    p.add_argument("--speed", action="store_true",
                   help="also time the exported network against the static network exported alike (OUT/static), "
                        "paired on test images, in that runtime and in PyTorch (OUT/speed.json)")
    p.add_argument("--latency-images", type=positive_int, default=200,
                   help="with --speed: single test images of the batch-1 latency")
    p.set_defaults(func=cmd_export)
