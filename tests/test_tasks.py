"""The example tasks (examples/tasks.py): disjoint held-out sets, determinism, chat forms."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

import tasks  # noqa: E402


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_held_out_prompts_are_disjoint_from_train_and_deterministic(name):
    train, held_out = tasks.make_task(name, 1000, 300, seed=0)
    assert len(train) == 1000 and len(held_out) == 300
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held_out}
    assert tasks.make_task(name, 1000, 300, seed=0) == (train, held_out)
    assert tasks.make_task(name, 1000, 300, seed=1)[1] != held_out


def test_suite_answers_follow_their_rules():
    rec = tasks.make_task("record", 50, 0)[0]
    for r in rec:
        last, rest = r["completion"].split(", ", 1)
        first, code, qty = rest.split(" | ")
        assert last.isupper() and code.isupper() and len(code) == 3
        word = tasks.NUMBER_WORDS[int(qty) - 1]
        assert word in r["prompt"] and first in r["prompt"]
    for r in tasks.make_task("shift", 50, 0)[0]:
        k, digits = (
            int(r["prompt"].split("by ")[1].split(":")[0]),
            r["prompt"].split(": ")[1].strip(),
        )
        assert r["completion"] == "".join(str((int(d) + k) % 10) for d in digits)
    # The codebook is one fixed mapping (same for every seed), one invented word per word.
    assert len(set(tasks.CODEBOOK.values())) == len(tasks.CODE_WORDS) == 48
    for seed in (0, 1):
        for r in tasks.make_task("codebook", 20, 0, seed)[0]:
            words = r["prompt"].split(": ")[1].split()
            assert r["completion"] == " ".join(tasks.CODEBOOK[w] for w in words)


def test_formats_write_chat_records(tmp_path):
    train, _ = tasks.write_task("date", tmp_path, 3, 2, fmt="both")
    assert train.name == "date.both.train.jsonl"
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    assert len(rows) == 6
    plain, chat = rows[0], rows[1]
    assert chat["messages"][0] == {"role": "user", "content": plain["prompt"].strip()}
    assert chat["messages"][1] == {"role": "assistant", "content": plain["completion"]}
    with pytest.raises(ValueError, match="format"):
        tasks.in_format([plain], "xml")
