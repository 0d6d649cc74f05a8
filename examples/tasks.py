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

Usage: ``python examples/tasks.py [--out examples/data] [--train 1000] [--eval 100]`` writes
``<task>.train.jsonl`` and ``<task>.eval.jsonl`` ({"prompt", "completion"} lines) for every
task. Train and eval sets are disjoint.
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


TASKS: dict[str, Callable[[random.Random], dict]] = {
    "date": _date,
    "json": _json,
    "reverse": _reverse,
}


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


def write_task(name: str, out: Path, n_train: int, n_eval: int, seed: int = 0) -> tuple[Path, Path]:
    train, held_out = make_task(name, n_train, n_eval, seed)
    paths = (Path(out) / f"{name}.train.jsonl", Path(out) / f"{name}.eval.jsonl")
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
    args = p.parse_args(argv)
    for name in filter(None, args.tasks.split(",")):
        try:
            paths = write_task(name.strip(), Path(args.out), args.train, args.eval, args.seed)
        except ValueError as e:
            print(f"tasks.py: error: {e}", file=sys.stderr)
            return 2
        print(*paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
