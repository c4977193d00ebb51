"""``s2d zoo``: list the pretrained checkpoints; ``s2d zoo add``: measure one into the manifest."""

from __future__ import annotations

import argparse
import json


def cmd_zoo(args: argparse.Namespace) -> int:
    from s2d.models.zoo import load_manifest

    entries = load_manifest()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    if not entries:
        print("the model zoo is empty")
        return 0
    print(f"{'name':<14}{'dataset':<16}{'test acc':>9}{'val acc':>9}{'MACs':>10}{'params':>10}")
    for e in entries:
        print(f"{e['name']:<14}{e['dataset']:<16}{e['test_accuracy'] * 100:>8.2f}%{e['val_accuracy'] * 100:>8.2f}%"
              f"{e['macs'] / 1e6:>9.2f}M{e['params'] / 1e6:>9.3f}M")
    return 0


def cmd_zoo_add(args: argparse.Namespace) -> int:
    from s2d.pipeline.zoo import add_to_zoo

    entry = add_to_zoo(args.checkpoint, name=args.name, command=args.command, data_dir=args.data_dir)
    print(f"added {entry['name']} ({entry['dataset']}): test {entry['test_accuracy']:.4f}, "
          f"val {entry['val_accuracy']:.4f}, {entry['macs'] / 1e6:.2f} M MACs")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list the pretrained checkpoints in model_zoo/")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_zoo)
    zsub = p.add_subparsers(dest="zoo_command", metavar="ACTION")
    pa = zsub.add_parser("add", help="measure a checkpoint and add it to the zoo manifest")
    pa.add_argument("checkpoint", help="model checkpoint written by train-base (checkpoints/model.pt)")
    pa.add_argument("--name", help="zoo name (default: the checkpoint's model name)")
    pa.add_argument("--command", required=True, help="the exact command that produced the checkpoint")
    pa.add_argument("--data-dir")
    pa.set_defaults(func=cmd_zoo_add)
