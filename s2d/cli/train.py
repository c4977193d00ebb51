"""``s2d train-base``: train a static model."""

from __future__ import annotations

import argparse
from pathlib import Path

from s2d.cli.args import add_data_args, add_model_args, add_runtime_args, check_device, float_in, positive_int


def cmd_train_base(args: argparse.Namespace) -> int:
    from s2d.training.static import TrainConfig, train_static

    cfg = TrainConfig(model=args.model, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                      optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
                      schedule=args.schedule, label_smoothing=args.label_smoothing, seed=args.seed,
                      val_size=args.val_size, split_seed=args.split_seed, train_limit=args.train_limit,
                      data_dir=args.data_dir, init_weights=args.init_weights, device=check_device(args.device))
    dataset = args.dataset.replace(":", "-").replace("/", "-")
    run_dir = args.run_dir or f"runs/train-{args.model.replace(':', '-')}-{dataset}"
    final = train_static(cfg, run_dir, progress=not args.quiet)
    ckpt = Path(run_dir) / "checkpoints" / "model.pt"
    print(f"trained {args.model}: val accuracy {final['val_acc']:.4f}; checkpoint {ckpt}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-base", help="train a static model (resumes when re-run)")
    add_model_args(p, weights_default=None)
    add_data_args(p)
    add_runtime_args(p)
    p.add_argument("--epochs", type=positive_int, default=10)
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--lr", type=float_in(0, 10, lo_open=True), default=0.2, help="peak learning rate")
    p.add_argument("--weight-decay", type=float_in(0, 1), default=5e-4)
    p.add_argument("--schedule", choices=("onecycle", "cosine"), default="onecycle")
    p.add_argument("--label-smoothing", type=float_in(0, 1, hi_open=True), default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=positive_int, help="train on the first N images only (smoke tests)")
    p.add_argument("--init-weights", help="checkpoint to start from (fine-tune) instead of random init")
    p.add_argument("--run-dir", help="default runs/train-MODEL-DATASET")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_base, data_parallel=True)
