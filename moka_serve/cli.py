"""``moka-serve``: start vLLM's OpenAI-compatible server with MoKA adapters (issue #4)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moka-serve",
        description="Serve many MoKA (and LoRA) adapters over one base model through vLLM's "
        "OpenAI-compatible HTTP server. With no arguments, serves the embedded default "
        "(SmolLM2-135M-Instruct, 4-bit) with the example adapters.",
    )
    p.add_argument("--base", help="base model: a local folder or a Hugging Face id")
    p.add_argument("--adapters", help="folder whose sub-folders are adapters, served by name")
    p.add_argument("--quantize", choices=["none", "4bit"], default="4bit", help="base weights")
    return p


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("moka-serve: the vLLM runtime is not implemented yet (issue #4).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
