"""Train MoKA and a LoRA baseline the same way on one example task and compare them.

Not a CI test: over the 4-bit SmolLM2-135M-Instruct base it takes tens of minutes on the
project's 2-core CPU machines (seconds on a GPU). Both adapters use the same data, loop,
schedule, seed and evaluation (``moka_trainer.train.train``); the script reports trainable
parameters, held-out exact-match accuracy and eval loss before and after training, wall time
and training tokens/s, as JSON (``--out/results.json``) and a Markdown table on stdout.

    .venv/bin/python benchmarks/train_quality.py --task date --train-examples 640 \\
        --eval-examples 50 --lr 1e-3 --out /tmp/train-quality
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))

from tasks import TASKS, make_task, write_jsonl  # noqa: E402

from moka_trainer.train import TrainConfig, TrainError, train  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=sorted(TASKS), default="date")
    p.add_argument("--base", default=None, help="base model (default: embedded SmolLM2-135M)")
    p.add_argument("--train-examples", type=int, default=640)
    p.add_argument("--eval-examples", type=int, default=50)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--micro-batch-size", type=int, default=16)
    p.add_argument("--components", type=int, default=4)
    p.add_argument("--budget", default=None, help="MoKA budget (default: cheapest shapes)")
    p.add_argument("--scaling", type=float, default=None, help="MoKA scaling (default: r)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--prompt-format", choices=("plain", "chat"), default="plain")
    p.add_argument("--no-quantize", dest="quantize", action="store_false")
    p.add_argument("--methods", default="moka,lora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--skip-before", action="store_true", help="do not evaluate the untrained base model"
    )
    p.add_argument("--out", default="/tmp/moka-train-quality")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default). On a shared 2-core machine 1 thread is "
        "several times faster than 2 fighting other processes for the cores",
    )
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    out = Path(args.out)
    train_recs, eval_recs = make_task(args.task, args.train_examples, args.eval_examples, args.seed)
    write_jsonl(out / "train.jsonl", train_recs)
    write_jsonl(out / "eval.jsonl", eval_recs)
    results: dict = {
        "task": args.task,
        "train_examples": len(train_recs),
        "eval_examples": len(eval_recs),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "args": vars(args),
        "runs": {},
    }
    before = None
    for method in filter(None, args.methods.split(",")):
        cfg = TrainConfig(
            data=str(out / "train.jsonl"),
            eval_data=str(out / "eval.jsonl"),
            out=str(out / method),
            base=args.base,
            method=method,
            components=args.components,
            budget=args.budget if method == "moka" else None,
            scaling=args.scaling,
            rank=args.rank,
            lr=args.lr,
            epochs=args.epochs,
            batch_size=args.batch_size,
            micro_batch_size=args.micro_batch_size,
            eval_batch_size=args.eval_examples,
            max_eval_examples=args.eval_examples,
            prompt_format=args.prompt_format,
            quantize=args.quantize,
            seed=args.seed,
            # the untrained model is the same base for every method: evaluate it once
            eval_before=before is None and not args.skip_before,
        )
        t0 = time.monotonic()
        try:
            res = train(cfg)
        except TrainError as e:
            print(f"train_quality: error: {e}", file=sys.stderr)
            return 2
        before = before or res.get("before") or ({} if args.skip_before else None)
        results["runs"][method] = {
            "trainable_params": res["trainable_params"],
            "scaling": res.get("scaling"),
            "steps": res["steps"],
            "first_loss": res["first_loss"],
            "last_loss": res["last_loss"],
            "before": before,
            "after": res.get("after"),
            "train_time_s": res["train_time_s"],
            "train_tokens_per_s": res["train_tokens_per_s"],
            "wall_time_s": round(time.monotonic() - t0, 1),
            "shapes": {t: d.get("shapes") for t, d in res["targets"].items()},
        }
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    print(
        f"\ntask {args.task}: {len(train_recs)} train / {len(eval_recs)} held-out records, "
        f"lr {args.lr:g}, batch {args.batch_size}, {args.epochs:g} epoch(s), "
        f"{'4-bit NF4' if args.quantize else 'unquantized'} base\n"
    )
    print(
        "| adapter | trainable params | exact match before | after | eval loss before | after "
        "| train wall time | train tokens/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for method, r in results["runs"].items():
        name = (
            f"MoKA r={args.components}, scaling {r['scaling']:g}"
            if method == "moka"
            else f"LoRA rank {args.rank}, alpha {2 * args.rank}"
        )
        b, a = r["before"] or {}, r["after"] or {}

        def pct(d: dict) -> str:
            return f"{100 * d['eval_exact_match']:.0f}%" if "eval_exact_match" in d else "n/a"

        def loss(d: dict) -> str:
            return f"{d['eval_loss']:.3f}" if "eval_loss" in d else "n/a"

        print(
            f"| {name} | {r['trainable_params']:,} | {pct(b)} | {pct(a)} | {loss(b)} | {loss(a)} "
            f"| {r['train_time_s']:.0f} s | {r['train_tokens_per_s']:.0f} |"
        )
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
