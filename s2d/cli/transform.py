"""Commands of the transform engine: ``s2d exits`` and ``s2d export``."""

from __future__ import annotations

import argparse
import json

from s2d.cli.args import add_data_args, add_model_args, add_runtime_args, check_device, float_in, load_data
from s2d.errors import S2DError


def cmd_exits(args: argparse.Namespace) -> int:
    from s2d.data import load_dataset
    from s2d.measure.cost import exit_macs
    from s2d.models.zoo import load_model
    from s2d.transform.graph import analyze

    info = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download).info
    model = load_model(args.model, info, args.weights)
    shape = (info.in_channels, info.image_size, info.image_size)
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
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exits", help="list a model's exit points with their cumulative static MACs")
    add_model_args(p)
    p.add_argument("--dataset", default="fashion-mnist", help="sets the input shape (and the zoo weights)")
    p.add_argument("--data-dir")
    p.add_argument("--download", action="store_true")
    add_runtime_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_exits)

    p = sub.add_parser("export", help="export a dynamic network, one file per stage (TorchScript or ONNX)")
    add_model_args(p)
    add_data_args(p)
    add_runtime_args(p)
    p.add_argument("--arch", help="MultiStageArch JSON (optional with a dynamic checkpoint as --weights)")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="onnx")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--tolerance", type=float_in(0, 100), default=0.5,
                   help="accuracy points below static allowed when calibrating missing thresholds")
    p.set_defaults(func=cmd_export)
