"""``moka-train``: train MoKA adapters over a 4-bit base, QLoRA-style (issue #3)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moka-train",
        description="Train a MoKA adapter over a (4-bit NF4) base model and write it in the "
        "MoKA adapter format v1 (docs/adapter-format.md).",
    )
    p.add_argument("--base", help="base model: a local folder or a Hugging Face id")
    p.add_argument("--data", help="training data, JSONL")
    p.add_argument("--out", help="output adapter folder")
    return p


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("moka-train: not implemented yet (issue #3).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
