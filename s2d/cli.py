"""The ``s2d`` command line: thin wrappers over the library.

Every user-fixable problem surfaces as one line on stderr and exit code 2;
Ctrl-C says how to resume. Handlers import heavy modules lazily so that
``s2d --help`` and ``s2d zoo`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from s2d.errors import S2DError

DEFAULT_MODEL = "resnet20"
DEFAULT_DATASET = "fashion-mnist"


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise S2DError(f"unknown --device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise S2DError(f"--device {device} asked for but CUDA is not available here; use --device cpu")
    return device


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=DEFAULT_DATASET,
                   help="fashion-mnist (default), cifar10, cifar100 or imagefolder:PATH")
    p.add_argument("--data-dir", help="where the dataset lives (default: $S2D_DATA, then the Debian package)")
    p.add_argument("--download", action="store_true", help="download cifar/fashion-mnist when online")
    p.add_argument("--val-size", type=_positive_int, default=5000, help="validation images carved from train")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/validation split")


def _add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: all cores)")


def _add_model_args(p: argparse.ArgumentParser, *, weights_default: str | None = "zoo") -> None:
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="registry name, e.g. resnet20, mobilenetv2, torchvision:resnet18")
    p.add_argument("--weights", default=weights_default,
                   help="'zoo' (the model zoo's checkpoint for this dataset), a checkpoint path, "
                        "a torchvision weights name, or 'none' for random init")


def _load(args: argparse.Namespace):
    """(dataset, model) for commands that evaluate a pretrained model."""
    from s2d.data import load_dataset
    from s2d.zoo import load_model

    data = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download,
                        val_size=args.val_size, split_seed=args.split_seed)
    model = load_model(args.model, data.info, args.weights)
    return data, model


def cmd_train_base(args: argparse.Namespace) -> int:
    from s2d.train import TrainConfig, train_static

    cfg = TrainConfig(model=args.model, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                      optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                      schedule=args.schedule, label_smoothing=args.label_smoothing, seed=args.seed,
                      val_size=args.val_size, split_seed=args.split_seed, train_limit=args.train_limit,
                      data_dir=args.data_dir, init_weights=args.init_weights, device=_check_device(args.device))
    dataset = args.dataset.replace(":", "-").replace("/", "-")
    run_dir = args.run_dir or f"runs/train-{args.model.replace(':', '-')}-{dataset}"
    final = train_static(cfg, run_dir, progress=not args.quiet)
    ckpt = Path(run_dir) / "checkpoints" / "model.pt"
    print(f"trained {args.model}: val accuracy {final['val_acc']:.4f}; checkpoint {ckpt}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from s2d.zoo import load_manifest

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
    from s2d.zoo import add_to_zoo

    entry = add_to_zoo(args.checkpoint, name=args.name, command=args.command, data_dir=args.data_dir)
    print(f"added {entry['name']} ({entry['dataset']}): test {entry['test_accuracy']:.4f}, "
          f"val {entry['val_accuracy']:.4f}, {entry['macs'] / 1e6:.2f} M MACs")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from s2d.report import evaluate_static, format_eval

    if args.arch:  # fail on a malformed arch file before the slow part
        from s2d.transform.arch import MultiStageArch

        MultiStageArch.load(args.arch)

    data, model = _load(args)
    result = evaluate_static(model, data, device=_check_device(args.device), limit=args.limit,
                             repeats=args.repeats)
    result.update(model=args.model, weights=str(args.weights), dataset=args.dataset)
    if args.arch:
        from s2d.report import evaluate_dynamic

        result["dynamic"] = evaluate_dynamic(args.model, model, data, args.arch, result,
                                             device=args.device, limit=args.limit, repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_eval(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from s2d import __version__

    parser = argparse.ArgumentParser(
        prog="s2d", description="Turn a pretrained static CNN into a dynamic multi-stage network.")
    parser.add_argument("--version", action="version", version=f"s2d {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train-base", help="train a static model (resumes when re-run)")
    _add_model_args(p, weights_default=None)
    _add_data_args(p)
    _add_runtime_args(p)
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=128)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=0.2, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=_positive_int, help="train on the first N images only (smoke tests)")
    p.add_argument("--init-weights", help="checkpoint to start from (fine-tune) instead of random init")
    p.add_argument("--run-dir", help="default runs/train-MODEL-DATASET")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_base)

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

    p = sub.add_parser("eval", help="test accuracy, MACs and CPU speed of a model (and of a dynamic arch)")
    _add_model_args(p)
    _add_data_args(p)
    _add_runtime_args(p)
    p.add_argument("--arch", help="MultiStageArch JSON file: add the dynamic network's figures")
    p.add_argument("--limit", type=_positive_int, help="evaluate on the first N test images only")
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed repeats for latency")
    p.add_argument("--json", action="store_true", help="machine-readable output (stable keys)")
    p.set_defaults(func=cmd_eval)

    from s2d import cli_search, cli_transform

    cli_transform.add_commands(sub, _add_model_args, _add_data_args, _add_runtime_args)
    cli_search.add_commands(sub, _add_model_args, _add_data_args, _add_runtime_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    # fvcore calls torch.jit.script at import; torch 2.14 warns about it on stderr, which would
    # break the "one line on stderr" promise for every command that counts MACs.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        _threads(args)
        return func(args)
    except S2DError as e:
        print(f"s2d: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s2d: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not bad input: one line, the traceback on request
        if os.environ.get("S2D_DEBUG"):
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"s2d: internal error: {type(e).__name__}: {first} (set S2D_DEBUG=1 for the traceback "
              "and please report it)", file=sys.stderr)
        return 1
