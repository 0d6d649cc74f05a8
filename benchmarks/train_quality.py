"""MoKA vs LoRA at matched trainable-parameter counts: a sweep over tasks, budgets and seeds.

Every run is one ``moka-train`` process (same data, loop, steps, schedule and evaluation for
every method), so the sweep measures exactly what a user gets. Budgets are given as LoRA ranks:
budget ``r`` is a rank-``r`` LoRA's parameter count on the same targets, and each MoKA method
gets that budget (``--budget``, 0.5% slack so that the gate logits of ``moka-lora`` fit).

The learning rate is chosen per method, not per run: each method trains at ``--lr-budget`` with
the first seed for every candidate in ``--lrs``, evaluated on a validation split carved from the
training data (disjoint from the held-out set); the best validation exact match (then loss)
wins. The held-out set is only used for the final numbers.

Methods: ``lora`` (PEFT LoRA, alpha = 2 x rank), ``moka`` (the defaults: mixed family, LoRA
init), ``moka-lora`` (rank-1 components only), ``moka-kron`` (balanced Kronecker shapes only,
the first release's family), ``moka-arand`` (mixed, A random / B zero), ``moka-nogate``
(mixed, components summed without softmax gates).

Writes ``OUT/results.json`` (every run), ``OUT/summary.md`` (mean and spread over seeds) and
``OUT/<task>.png`` (held-out exact match and eval loss against trainable parameters). Runs that
finished before (their ``train_info.json`` exists) are reused, so an interrupted sweep resumes.

    .venv/bin/python benchmarks/train_quality.py --tasks codebook --budgets 1,2,4,8 \\
        --methods lora,moka --seeds 0,1 --lrs 3e-3,1e-2 --jobs 2 --out /tmp/tq
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

from tasks import SUITE, TASKS, make_task, write_jsonl  # noqa: E402

METHODS = {
    "lora": ["--method", "lora"],
    "moka": ["--method", "moka"],
    "moka-lora": ["--method", "moka", "--shape-family", "lora"],
    "moka-kron": ["--method", "moka", "--shape-family", "kron"],
    "moka-arand": ["--method", "moka", "--init", "a-random"],
    "moka-nogate": ["--method", "moka", "--no-gating"],
}


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def lora_size(base: Path, targets: list[str], rank: int) -> int:
    """A rank-``rank`` LoRA's parameters on ``targets`` of a Llama-style base (config.json)."""
    from moka_core.base_models import llama_dims
    from moka_core.shapes import lora_params

    dims, layers = llama_dims(base)
    return lora_params({t: dims[t] for t in targets}, dict.fromkeys(targets, layers), rank)


def run_args(method: str, rank: int, base: Path, targets: list[str], components: int) -> list[str]:
    args = list(METHODS[method])
    if method == "lora":
        return args + ["--rank", str(rank)]
    from moka_core.shapes import BUDGET_SLACK

    budget = int(lora_size(base, targets, rank) * BUDGET_SLACK)
    if method == "moka-kron":
        args += ["--components", str(min(components, rank))]
    return args + ["--budget", str(budget)]


def train_run(folder: Path, cli_args: list[str], log: Path) -> dict:
    """One moka-train process (1 thread); its train_info.json, reused when it exists."""
    info = folder / "train_info.json"
    if not info.is_file():
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "moka_trainer.cli", *cli_args, "--out", str(folder)]
        with open(log, "w") as f:
            r = subprocess.run(
                cmd + ["--threads", "1"], stdout=f, stderr=subprocess.STDOUT, env=env
            )
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}); see {log}")
    return json.loads(info.read_text())


def run_header(args: argparse.Namespace, argv: list[str] | None) -> dict:
    """The machine, the command and the options of a sweep, first in its results."""
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "args": vars(args),
    }


def summary_of(info: dict) -> dict:
    after = info.get("after") or {}
    return {
        "trainable_params": info["trainable_params"],
        "exact_match": after.get("eval_exact_match"),
        "eval_loss": after.get("eval_loss"),
        "train_tokens_per_s": info.get("train_tokens_per_s"),
        "train_time_s": info.get("train_time_s"),
        "steps": info.get("steps"),
        "shapes": {t: d.get("shapes") for t, d in info.get("targets", {}).items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(SUITE), help=f"from {sorted(TASKS)}")
    p.add_argument("--budgets", default="1,2,4,8", help="LoRA ranks whose sizes are the budgets")
    p.add_argument("--methods", default="lora,moka", help=f"from {sorted(METHODS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lrs", default="3e-3,1e-2", help="candidate learning rates")
    p.add_argument("--lr-budget", type=int, default=4, help="budget (rank) of the lr choice")
    p.add_argument("--lr", default=None, help="skip the choice: METHOD=LR,... for every method")
    p.add_argument("--base", default=None, help="base model (default: embedded SmolLM2-135M)")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--components", type=int, default=4, help="moka-kron's components")
    p.add_argument("--train-examples", type=int, default=640)
    p.add_argument("--val-examples", type=int, default=100)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="/tmp/moka-train-quality")
    args = p.parse_args(argv)
    from moka_core.base_models import materialize_default_base

    base = Path(args.base) if args.base else materialize_default_base()
    tasks, methods = _csv(args.tasks), _csv(args.methods)
    budgets, seeds = [int(b) for b in _csv(args.budgets)], [int(s) for s in _csv(args.seeds)]
    lrs = [float(x) for x in _csv(args.lrs)]
    targets = _csv(args.targets)
    bad = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in TASKS]
    if bad:
        p.error(f"unknown methods or tasks: {bad}")
    out = Path(args.out)
    common = ["--targets", ",".join(targets), "--batch-size", str(args.batch_size)]
    common += ["--micro-batch-size", str(args.batch_size), "--epochs", str(args.epochs)]
    common += ["--eval-batch-size", "50", "--no-eval-before", "--no-progress"]
    if args.base:
        common += ["--base", str(base)]
    results: dict = {
        **run_header(args, argv),
        "lora_sizes": {r: lora_size(base, targets, r) for r in budgets},
        "tasks": {},
    }
    pool = ThreadPoolExecutor(max(1, args.jobs))

    def save() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    for task in tasks:
        tdir = out / task
        train, held_out = make_task(
            task, args.train_examples + args.val_examples, args.eval_examples, args.data_seed
        )
        train, val = train[: args.train_examples], train[args.train_examples :]
        for name, recs in (("train", train), ("val", val), ("test", held_out)):
            write_jsonl(tdir / f"{name}.jsonl", recs)
        data = ["--data", str(tdir / "train.jsonl")]
        res = results["tasks"].setdefault(task, {"lr_choice": {}, "runs": []})
        res["records"] = {"train": len(train), "val": len(val), "test": len(held_out)}

        # 1. the learning rate per method, on the validation split
        chosen = dict(kv.split("=") for kv in _csv(args.lr)) if args.lr else {}
        jobs = {}
        for m in methods:
            if m in chosen:
                continue
            for lr in lrs:
                folder = tdir / "lr" / f"{m}-r{args.lr_budget}-lr{lr:g}"
                folder.mkdir(parents=True, exist_ok=True)
                cli = data + ["--eval-data", str(tdir / "val.jsonl"), "--lr", str(lr)]
                cli += ["--seed", str(seeds[0]), *common]
                cli += run_args(m, args.lr_budget, base, targets, args.components)
                jobs[(m, lr)] = pool.submit(
                    train_run, folder, cli, folder.parent / f"{folder.name}.log"
                )
        for (m, lr), fut in jobs.items():
            s = summary_of(fut.result())
            res["lr_choice"].setdefault(m, {})[f"{lr:g}"] = s
        for m in methods:
            if m not in chosen:
                cand = res["lr_choice"][m]
                best = max(cand, key=lambda k: (cand[k]["exact_match"] or 0, -cand[k]["eval_loss"]))
                chosen[m] = best
        res["lr"] = {m: float(chosen[m]) for m in methods}
        save()

        # 2. every (method, budget, seed) on the held-out set
        jobs = {}
        for r in budgets:
            for m in methods:
                for seed in seeds:
                    folder = tdir / "runs" / f"{m}-r{r}-s{seed}"
                    folder.mkdir(parents=True, exist_ok=True)
                    cli = data + ["--eval-data", str(tdir / "test.jsonl"), "--lr", str(chosen[m])]
                    cli += ["--seed", str(seed), "--max-eval-examples", str(args.eval_examples)]
                    cli += [*common, *run_args(m, r, base, targets, args.components)]
                    log = folder.parent / f"{folder.name}.log"
                    jobs[(m, r, seed)] = pool.submit(train_run, folder, cli, log)
        res["runs"] = []
        for (m, r, seed), fut in jobs.items():
            res["runs"].append({"method": m, "budget_rank": r, "seed": seed,
                                **summary_of(fut.result())})  # fmt: skip
            save()
    pool.shutdown()
    (out / "summary.md").write_text(markdown(results) + "\n")
    for task in results["tasks"]:
        plot(results, task, out / f"{task}.png")
    print(markdown(results))
    print(f"\nresults: {out / 'results.json'}")
    return 0


def _group(runs: list[dict]) -> dict[tuple[str, int], list[dict]]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["budget_rank"]), []).append(r)
    return groups


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def markdown(results: dict) -> str:
    lines = []
    for task, res in results["tasks"].items():
        methods = sorted({r["method"] for r in res["runs"]}, key=list(METHODS).index)
        budgets = sorted({r["budget_rank"] for r in res["runs"]})
        groups = _group(res["runs"])
        seeds = len({r["seed"] for r in res["runs"]})
        lines += [
            f"### {task}: held-out exact match (eval loss), mean ± half-range over {seeds} seeds",
            "",
            "lr per method (validation split): "
            + ", ".join(f"{m} {lr:g}" for m, lr in res["lr"].items()),
            "",
            "| budget | " + " | ".join(methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for b in budgets:
            cells = []
            for m in methods:
                g = groups.get((m, b), [])
                if not g:
                    cells.append("")
                    continue
                em, sp = _mean_spread([100 * r["exact_match"] for r in g])
                loss, _ = _mean_spread([r["eval_loss"] for r in g])
                cells.append(f"{em:.1f}% ± {sp:.1f} ({loss:.3f}), {g[0]['trainable_params']:,} p")
            size = results["lora_sizes"].get(b) or results["lora_sizes"].get(str(b))
            lines.append(f"| LoRA-{b} size ({size:,}) | " + " | ".join(cells) + " |")
        speeds = {
            m: statistics.median(r["train_tokens_per_s"] for r in res["runs"] if r["method"] == m)
            for m in methods
        }
        lines += ["", "median train tokens/s (all runs of a method; runs in parallel, one thread "
                  "each): " + ", ".join(f"{m} {v:.0f}" for m, v in speeds.items()), ""]  # fmt: skip
    return "\n".join(lines)


def plot(results: dict, task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results["tasks"][task]
    groups = _group(res["runs"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for m in sorted({r["method"] for r in res["runs"]}, key=list(METHODS).index):
        keys = sorted(k for k in groups if k[0] == m)
        xs = [statistics.fmean(r["trainable_params"] for r in groups[k]) for k in keys]
        for ax, field, scale in ((axes[0], "exact_match", 100), (axes[1], "eval_loss", 1)):
            vals = [[scale * r[field] for r in groups[k]] for k in keys]
            mean = [statistics.fmean(v) for v in vals]
            err = [
                [mu - min(v) for mu, v in zip(mean, vals, strict=True)],
                [max(v) - mu for mu, v in zip(mean, vals, strict=True)],
            ]
            ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=m)
    for ax, label in ((axes[0], "held-out exact match (%)"), (axes[1], "held-out eval loss")):
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"{task}: MoKA vs LoRA at matched parameter counts (4-bit SmolLM2-135M, q/v)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    t0 = time.monotonic()
    rc = main()
    print(f"sweep wall time {time.monotonic() - t0:.0f} s", file=sys.stderr)
    sys.exit(rc)
