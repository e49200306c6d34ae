# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""The ``dualroute`` command: ``demo``, ``convert``, ``fetch-assets``."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dualroute", description="Bi-level routing attention for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="convert a real pretrained encoder, classify with pipeline(), show routing"
    )
    demo.add_argument("--out", default="outputs/demo-model", help="where the demo saves its checkpoint")
    commands.add_parser(
        "fetch-assets", help="fetch the offline assets (pretrained MiniLM, news, reviews); prints the MiniLM folder"
    )
    convert = commands.add_parser("convert", help="convert a dense BERT-family or BART checkpoint to DualRoute")
    convert.add_argument("src", help="local checkpoint folder or Hub name")
    convert.add_argument("out", help="output folder")
    convert.add_argument("--task", default="auto", choices=["auto", "base", "sequence-classification", "seq2seq"])
    convert.add_argument("--block-size", type=int, default=64)
    convert.add_argument("--topk", type=int, default=8)
    convert.add_argument("--global-blocks", type=int, default=1)
    convert.add_argument(
        "--max-position-embeddings", type=int, default=None, help="extend learned positions by copying"
    )
    convert.add_argument("--num-labels", type=int, default=None)
    convert.add_argument(
        "--dense-last-layers", type=int, default=0, help="keep the last N encoder layers dense (full attention)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.command == "fetch-assets":
        from .assets import fetch_all, minilm_dir

        for path in fetch_all():
            print(f"ok {path}")
        print(f"pretrained all-MiniLM-L6-v2 (a checkpoint folder for `dualroute convert`): {minilm_dir()}")
        return 0
    if args.command == "convert":
        from .conversion import convert as convert_checkpoint

        try:
            _, report = convert_checkpoint(
                args.src,
                args.out,
                task=args.task,
                block_size=args.block_size,
                topk=args.topk,
                global_blocks=args.global_blocks,
                max_position_embeddings=args.max_position_embeddings,
                num_labels=args.num_labels,
                dense_last_layers=args.dense_last_layers,
            )
        except (ValueError, OSError) as error:
            print(f"dualroute convert: error: {error}", file=sys.stderr)
            return 2
        print(report)
        print(f"saved to {args.out}")
        return 0
    from .demo import run_demo

    run_demo(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
