"""``moka-bench``: latency and throughput of MoKA versus multi-LoRA serving (issue #5)."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moka-bench",
        description="Benchmark MoKA serving against the base model and multi-LoRA serving.",
    )
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="drive a running OpenAI-compatible server with a workload")
    sub.add_parser("compare", help="base vs MoKA vs LoRA, interleaved, in one run")
    return p


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("moka-bench: not implemented yet (issue #5).", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
