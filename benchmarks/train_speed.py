"""Training speed of MoKA vs LoRA at matched parameter counts, side by side in one process.

One 4-bit base is loaded once. For each budget (a rank-r LoRA's size) and each repeat, a LoRA
and a MoKA adapter of that size are attached in turn as ``moka-train`` attaches them (both PEFT
models: ``moka_trainer.train.attach_adapter``), interleaved, and timed on the same fixed batches:
forward (the model's own loss on logits cropped to the labels, as the Trainer's collator asks),
backward and an AdamW step. The first steps of every attachment are warm-up and not counted. Reports the median
step time over repeats and the median over repeats of the MoKA / LoRA tokens/s ratio (each
repeat times both back to back, so drifting load on a shared machine cancels), as JSON and
Markdown.

    .venv/bin/python benchmarks/train_speed.py --budgets 1,4,8 --repeats 3 --steps 6 \\
        --threads 1 --out benchmarks/results/train-speed
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from tasks import make_task  # noqa: E402

from moka_peft.planning import count_base_params  # noqa: E402
from moka_trainer import data as data_mod  # noqa: E402
from moka_trainer.base_model import load_base_model, resolve_base  # noqa: E402
from moka_trainer.train import TrainConfig, attach_adapter  # noqa: E402


def time_steps(model, batches, steps: int, warmup: int) -> list[float]:
    """Seconds per optimizer step (forward + backward + AdamW) after ``warmup`` steps."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model.train()
    times = []
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None)
    p.add_argument("--task", default="record")
    p.add_argument("--budgets", default="1,4,8", help="LoRA ranks whose sizes are the budgets")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="/tmp/moka-train-speed")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    targets = args.targets.split(",")
    base = resolve_base(args.base, lambda m: print(m, file=sys.stderr))
    model, tok = load_base_model(
        base, quantize=True, device=torch.device("cpu"), dtype=torch.float32
    )
    records = make_task(args.task, 4 * args.batch_size, 0)[0]
    tokenize = data_mod.Tokenize(tok)
    examples = [tokenize(r, "speed", i) for i, r in enumerate(records)]
    collate = data_mod.CompletionCollator(tok.pad_token_id)
    batches = [
        collate(examples[i : i + args.batch_size]) for i in range(0, len(examples), args.batch_size)
    ]
    tokens = statistics.fmean(int(b["attention_mask"].sum()) for b in batches)
    base_params = count_base_params(model)
    rows = []
    for r in [int(b) for b in args.budgets.split(",")]:
        cfgs = {
            "lora": TrainConfig(data="-", out="-", method="lora", rank=r, targets=targets),
            "moka": TrainConfig(data="-", out="-", budget=f"lora-{r}", targets=targets),
        }
        per = {m: [] for m in cfgs}
        infos = {}
        for _ in range(args.repeats):
            for m, cfg in cfgs.items():  # interleaved: lora, moka, lora, moka, ...
                torch.manual_seed(0)
                peft_model, info = attach_adapter(model, cfg, base_params)
                per[m].append(
                    statistics.median(time_steps(peft_model, batches, args.steps, args.warmup))
                )
                model = peft_model.unload()
                infos[m] = info
                for q in model.parameters():
                    q.requires_grad_(False)
        med = {m: statistics.median(v) for m, v in per.items()}
        rows.append({
            "budget_rank": r,
            "params": {m: i["trainable_params"] for m, i in infos.items()},
            "step_s": med,
            "step_s_all": per,
            "tokens_per_s": {m: tokens / s for m, s in med.items()},
            # per repeat (lora and moka timed back to back), then the median: robust to drift
            "moka_over_lora_tokens_per_s": statistics.median(
                lo / mo for lo, mo in zip(per["lora"], per["moka"], strict=True)
            ),
            "moka_shapes": {t: d["shapes"] for t, d in infos["moka"]["targets"].items()},
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "machine": f"{platform.machine()}, {args.threads} thread(s)",
        "command": " ".join(["benchmarks/train_speed.py", *(argv or sys.argv[1:])]),
        "tokens_per_batch": tokens,
        "rows": rows,
    }
    (out / "train-speed.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "| budget | LoRA params | MoKA params | LoRA step | MoKA step | MoKA / LoRA tokens/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| LoRA-{row['budget_rank']} size | {row['params']['lora']:,} | "
            f"{row['params']['moka']:,} | {row['step_s']['lora']:.2f} s | "
            f"{row['step_s']['moka']:.2f} s | {row['moka_over_lora_tokens_per_s']:.2f} |"
        )
    (out / "train-speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
