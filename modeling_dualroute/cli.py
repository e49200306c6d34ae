# Copyright 2026 The DualRoute Authors. Licensed under the Apache License, Version 2.0.
"""The ``dualroute`` command: ``demo``, ``fetch-assets``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dualroute", description="Bi-level routing attention for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="route and attend a long input, offline")
    commands.add_parser("fetch-assets", help="fetch the offline assets (pretrained MiniLM, news, reviews)")
    args = parser.parse_args(argv)
    if args.command == "fetch-assets":
        from .assets import fetch_all

        for path in fetch_all():
            print(f"ok {path}")
        return 0
    from .demo import run_demo

    run_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())
