"""``moka-bench``: latency and throughput of MoKA versus multi-LoRA serving (issue #5).

``moka-bench serve`` drives a running OpenAI-compatible server with one workload;
``moka-bench compare`` starts one engine and measures base, MoKA and LoRA requests interleaved;
``moka-bench soak`` keeps many streams in flight while a fault injector changes adapter folders.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .report import markdown
from .workload import POPULARITIES, parse_length, workload_config


def _token_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad token range {text!r}: use LO:HI") from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"bad token range {text!r}: need 0 <= LO < HI")
    return lo, hi


def _length(text: str) -> str:
    try:
        parse_length(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_workload_args(p: argparse.ArgumentParser, popularity: bool = True) -> None:
    """Options shared by ``serve`` and ``compare``: the workload and how it arrives
    (``compare`` sweeps popularities with its own ``--popularities``)."""
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=32)
    g.add_argument("--concurrency", type=int, default=8, help="requests in flight (at most)")
    g.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="open loop at this many requests/s (gamma arrivals); default: closed loop",
    )
    g.add_argument("--burstiness", type=float, default=1.0, help="arrival cv (1 = Poisson)")
    if popularity:
        g.add_argument("--popularity", choices=POPULARITIES, default="distinct")
    g.add_argument("--powerlaw-alpha", type=float, default=1.0)
    g.add_argument("--input-len", type=_length, default="64", help="N, uniform:LO:HI, ...")
    g.add_argument("--output-len", type=_length, default="32", help="N, uniform:LO:HI, ...")
    g.add_argument("--token-range", type=_token_range, default=(10, 1000), help="prompt ids LO:HI")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    g.add_argument("--no-progress", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moka-bench",
        description="Benchmark MoKA serving against the base model and multi-LoRA serving.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="drive a running OpenAI-compatible server with a workload")
    s.add_argument("--base-url", default="http://127.0.0.1:8000")
    s.add_argument(
        "--adapters",
        nargs="+",
        default=None,
        help="adapter names to spread requests over ('all': every adapter the server lists); "
        "default: the base model",
    )
    s.add_argument("--api-key", default="none")
    s.add_argument("--out", type=Path, default=None, help="JSON report (a .md is written beside)")
    add_workload_args(s)

    from .compare import add_compare_args

    c = sub.add_parser("compare", help="base vs MoKA vs LoRA in one engine, interleaved")
    add_compare_args(c)
    add_workload_args(c, popularity=False)

    from .soak import add_soak_args

    k = sub.add_parser("soak", help="streams over many adapters while faults change the disk")
    add_soak_args(k)

    from .slots import add_slots_args

    m = sub.add_parser("slots", help="adapter latency against the memory given to slots")
    add_slots_args(m)
    return p


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import choose_models, run_serve, write_report

    models = choose_models(args.base_url, args.adapters, args.api_key)
    report = run_serve(
        args.base_url,
        models,
        workload_config(args),
        concurrency=args.concurrency,
        progress=not args.no_progress,
        timeout_s=args.timeout,
        api_key=args.api_key,
    )
    report["command"] = shlex.join(["moka-bench", *sys.argv[1:]])
    title = f"{args.popularity} over {len(models)} model(s), concurrency {args.concurrency}"
    print(markdown(report["summary"], title))
    if args.out:
        md = write_report(report, args.out, title)
        print(f"wrote {args.out} and {md}")
    for e in report["errors"]:
        print(f"moka-bench: request failed: {e}", file=sys.stderr)
    return 0 if report["summary"]["requests"]["failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .serve import BenchError
    from .server import ServerError

    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "soak":
            from .soak import cmd_soak

            return cmd_soak(args)
        if args.command == "slots":
            from .slots import cmd_slots

            return cmd_slots(args)
        from .compare import cmd_compare

        return cmd_compare(args)
    except (BenchError, ServerError, ValueError) as e:
        print(f"moka-bench: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moka-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
