"""Synthetic example tasks for moka-train, generated in code (deterministic for a seed).

Each task is a prompt -> completion mapping that SmolLM2-135M-Instruct does not produce in the
exact expected form out of the box, but that a small adapter learns in minutes on a CPU:

* ``date``: an ISO date to "day Month year" (``2024-03-15`` -> ``15 March 2024``): a fixed
  month lookup plus reordering.
* ``json``: a sentence about a person to a fixed JSON record
  (``Alice Smith is 31 and lives in Paris.`` -> ``{"name": "Alice Smith", "age": 31, "city": "Paris"}``):
  copying spans into a template.
* ``reverse``: three words in reverse order (``cat sun tree`` -> ``tree sun cat``): harder for
  an adapter on q/v only; useful to see where small adapters stop.

The **suite** (``SUITE``) is for comparing adapters, not for demos: tasks of graded difficulty
where the base model starts near 0% and where an adapter's capacity, not the output format, limits
held-out accuracy (the three above all reach 100% with any adapter):

* ``record`` (medium): multi-field extraction with transformations
  (``Ship three lamps to Vera Chen in Oslo.`` -> ``CHEN, Vera | OSL | 3``): upper-casing, a city
  code, a number word to digits, from several sentence forms.
* ``shift`` (medium-hard): arithmetic-like rewriting, every digit plus k mod 10
  (``Shift each digit by 3: 40721`` -> ``73054``), k given in the prompt.
* ``codebook`` (hard): a small closed-book association learned compositionally: 48 English words
  each stand for an invented word (a fixed codebook, the same for every seed); prompts are three
  words, held-out prompts are word combinations never seen in training.

Usage: ``python examples/tasks.py [--out examples/data] [--train 1000] [--eval 100]`` writes
``<task>.train.jsonl`` and ``<task>.eval.jsonl`` ({"prompt", "completion"} lines) for every
task; ``--format messages`` writes chat records ({"messages": [user, assistant]}) and
``--format both`` each record in both forms (``<task>.<format>.train.jsonl``). Train and eval sets are disjoint.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

MONTHS = (
    "January February March April May June July August September October November December"
).split()
FIRST = (
    "Alice Bob Carla David Emma Farid Grace Hiro Ines Jonas Kemal Lena Mateo Nora Omar Priya "
    "Quentin Rosa Sven Tara Umar Vera Wei Xenia Yusuf Zoe"
).split()
LAST = (
    "Smith Garcia Chen Novak Okafor Rossi Tanaka Silva Müller Kowalski Haddad Larsen Ivanova "
    "Dubois Mensah Patel Kim Costa Berg Ahmed"
).split()
CITIES = (
    "Paris Lagos Lima Oslo Seoul Cairo Quito Rome Hanoi Dakar Porto Bern Accra Riga Kyoto Perth "
    "Austin Leeds Cork Split"
).split()
WORDS = (
    "cat sun tree river stone cloud apple lamp road bird glass chair music paper storm light "
    "horse seed field bread"
).split()
JSON_TEMPLATES = (
    "{name} is {age} and lives in {city}.",
    "{name}, aged {age}, lives in {city}.",
    "Meet {name} from {city}, who is {age} years old.",
    "{city} is home to {name}, age {age}.",
    "{name} ({age}) moved to {city}.",
)


def _date(rng: random.Random) -> dict:
    y, m, d = rng.randint(1950, 2049), rng.randint(1, 12), rng.randint(1, 28)
    return {
        "prompt": f"Write the date {y:04d}-{m:02d}-{d:02d} as day month year.\n",
        "completion": f"{d} {MONTHS[m - 1]} {y}",
    }


def _json(rng: random.Random) -> dict:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    age, city = rng.randint(18, 90), rng.choice(CITIES)
    sentence = rng.choice(JSON_TEMPLATES).format(name=name, age=age, city=city)
    record = json.dumps({"name": name, "age": age, "city": city}, ensure_ascii=False)
    return {"prompt": f"Extract name, age and city as JSON: {sentence}\n", "completion": record}


def _reverse(rng: random.Random) -> dict:
    ws = rng.sample(WORDS, 3)
    return {
        "prompt": f"Reverse the order of the words: {' '.join(ws)}\n",
        "completion": " ".join(reversed(ws)),
    }


NUMBER_WORDS = "one two three four five six seven eight nine".split()
RECORD_ITEMS = "lamps chairs books boxes plates clocks kites bottles".split()
RECORD_TEMPLATES = (
    "Ship {n} {item} to {first} {last} in {city}.",
    "{first} {last} from {city} ordered {n} {item}.",
    "Send {n} {item} to {city}, attention {first} {last}.",
    "Order for {first} {last} ({city}): {n} {item}.",
)


def _record(rng: random.Random) -> dict:
    first, last, city = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)
    k = rng.randint(1, 9)
    sentence = rng.choice(RECORD_TEMPLATES).format(
        n=NUMBER_WORDS[k - 1], item=rng.choice(RECORD_ITEMS), first=first, last=last, city=city
    )
    return {
        "prompt": f"File this order as SURNAME, Name | CITY CODE | quantity: {sentence}\n",
        "completion": f"{last.upper()}, {first} | {city[:3].upper()} | {k}",
    }


def _shift(rng: random.Random) -> dict:
    k = rng.randint(1, 9)
    digits = "".join(str(rng.randint(0, 9)) for _ in range(5))
    shifted = "".join(str((int(d) + k) % 10) for d in digits)
    return {"prompt": f"Shift each digit by {k}: {digits}\n", "completion": shifted}


CODE_WORDS = (
    "red blue green black white gold river stone cloud apple lamp road bird glass chair music "
    "paper storm light horse seed field bread water fire wind snow moon star tree door house "
    "ship king queen child wolf bear fish salt iron milk rain hill lake boat rope bell"
).split()


def _codebook_map() -> dict[str, str]:
    """The fixed codebook: each word of CODE_WORDS -> a distinct invented two-syllable word."""
    rng = random.Random("codebook-v1")
    onsets, vowels = "b d f g k l m n p r s t v z".split(), "a e i o u".split()
    codas = "n r s l".split()
    words: set[str] = set()
    out = {}
    for w in CODE_WORDS:
        while True:
            cand = (
                rng.choice(onsets) + rng.choice(vowels) + rng.choice(onsets) + rng.choice(vowels)
                + rng.choice(codas)
            )  # fmt: skip
            if cand not in words:
                words.add(cand)
                out[w] = cand
                break
    return out


CODEBOOK = _codebook_map()


def _codebook(rng: random.Random) -> dict:
    ws = rng.sample(CODE_WORDS, 3)
    return {
        "prompt": f"Translate into Veltic: {' '.join(ws)}\n",
        "completion": " ".join(CODEBOOK[w] for w in ws),
    }


TASKS: dict[str, Callable[[random.Random], dict]] = {
    "date": _date,
    "json": _json,
    "reverse": _reverse,
    "record": _record,
    "shift": _shift,
    "codebook": _codebook,
}
# The tasks that separate adapters (see the module docstring), easiest first.
SUITE = ("record", "shift", "codebook")


def make_task(name: str, n_train: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    """``n_train`` training and ``n_eval`` held-out records (no prompt in both)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {sorted(TASKS)}")
    rng = random.Random(f"{name}-{seed}")
    seen: set[str] = set()
    records: list[dict] = []
    tries = 0
    while len(records) < n_train + n_eval:
        tries += 1
        if tries > 100 * (n_train + n_eval):
            raise ValueError(f"task {name!r} cannot make {n_train + n_eval} distinct records")
        rec = TASKS[name](rng)
        if rec["prompt"] not in seen:
            seen.add(rec["prompt"])
            records.append(rec)
    return records[:n_train], records[n_train:]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def as_messages(rec: dict) -> dict:
    """The record as a chat turn: what a ``/v1/chat/completions`` client sends and gets back."""
    return {
        "messages": [
            {"role": "user", "content": rec["prompt"].strip()},
            {"role": "assistant", "content": rec["completion"]},
        ]
    }


def in_format(records: list[dict], fmt: str) -> list[dict]:
    """``plain`` (prompt/completion), ``messages`` (chat), or ``both`` (each record twice)."""
    if fmt == "plain":
        return records
    if fmt == "messages":
        return [as_messages(r) for r in records]
    if fmt == "both":
        return [x for r in records for x in (r, as_messages(r))]
    raise ValueError(f"format must be plain, messages or both, got {fmt!r}")


def write_task(
    name: str, out: Path, n_train: int, n_eval: int, seed: int = 0, fmt: str = "plain"
) -> tuple[Path, Path]:
    train, held_out = make_task(name, n_train, n_eval, seed)
    train, held_out = in_format(train, fmt), in_format(held_out, fmt)
    stem = name if fmt == "plain" else f"{name}.{fmt}"
    paths = (Path(out) / f"{stem}.train.jsonl", Path(out) / f"{stem}.eval.jsonl")
    write_jsonl(paths[0], train)
    write_jsonl(paths[1], held_out)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write the synthetic example tasks as JSONL.")
    p.add_argument("--out", default=str(Path(__file__).parent / "data"), help="output folder")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    p.add_argument("--train", type=int, default=1000, help="training records per task")
    p.add_argument("--eval", type=int, default=100, help="held-out records per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--format",
        choices=("plain", "messages", "both"),
        default="plain",
        help="plain prompt/completion records, chat messages records, or each record in both "
        "forms (an adapter that answers on /v1/completions and /v1/chat/completions)",
    )
    args = p.parse_args(argv)
    for name in filter(None, args.tasks.split(",")):
        try:
            paths = write_task(
                name.strip(), Path(args.out), args.train, args.eval, args.seed, args.format
            )
        except ValueError as e:
            print(f"tasks.py: error: {e}", file=sys.stderr)
            return 2
        print(*paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
