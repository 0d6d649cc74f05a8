"""Fuzzing the adapter format reader: mutated folders fail with ``ValueError`` or load, nothing else.

A seeded mutator (no extra dependency, bounded: a few hundred cases in a few seconds) starts from
valid MoKA folders and corrupts the weights' bytes (header length, header JSON, data), the header
JSON structurally (dtypes, shapes, offsets, keys, huge and negative numbers) and the config JSON
(types, missing keys, huge dims, deep nesting). Every case must give ``ValueError`` with a reason,
or load and fold, with finite results, within a time limit; no other exception, no hang, and the
process's memory must not grow by more than a small multiple of the file sizes (a header that
claims a huge tensor must not be allocated).
"""

from __future__ import annotations

import copy
import json
import random
import resource
import struct
import time
from pathlib import Path

import pytest

from moka_core.adapter_format import CONFIG_NAME, WEIGHTS_NAME, load_adapter
from moka_serve.bench.random_adapters import random_moka, write_moka

DIMS = {"q_proj": (64, 48), "v_proj": (32, 48), "down_proj": (48, 96)}
CASES = 400
SECONDS_PER_CASE = 2.0


def _seed_folders(root: Path) -> list[Path]:
    specs = [
        ({"q_proj": [[8, 6, 8, 8], [64, 1, 1, 48]]}, "moka"),
        ({"v_proj": [[4, 4, 8, 12]], "down_proj": [[6, 6, 8, 16]]}, "mokas"),
    ]
    out = []
    for i, (comps, variant) in enumerate(specs):
        ad = random_moka(comps, seed=i, dims=DIMS, layers=2, variant=variant)
        out.append(write_moka(root / f"seed-{i}", ad))
    return out


def _split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def _join(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


WEIRD_NUMBERS = [0, -1, 1, 2**31, 2**63 - 1, 2**64, 10**30, 3.5, "7", None, True, [], {}]


def _mutate_value(rng: random.Random, v):
    choice = rng.random()
    if choice < 0.5:
        return rng.choice(WEIRD_NUMBERS)
    if isinstance(v, list) and v:
        v = list(v)
        op = rng.randrange(3)
        if op == 0:
            v.pop(rng.randrange(len(v)))
        elif op == 1:
            v.append(rng.choice(WEIRD_NUMBERS))
        else:
            i = rng.randrange(len(v))
            v[i] = _mutate_value(rng, v[i])
        return v
    if isinstance(v, str):
        return rng.choice(["", "F64", "I8", "BF16", "F16", "moka", "x" * 300, v + "."])
    return rng.choice(WEIRD_NUMBERS)


def _mutate_json(rng: random.Random, obj: dict) -> dict:
    obj = copy.deepcopy(obj)
    for _ in range(rng.randint(1, 3)):
        # walk to a random dict inside
        node = obj
        for _ in range(rng.randint(0, 3)):
            subs = [k for k, v in node.items() if isinstance(v, dict) and v]
            if not subs:
                break
            node = node[rng.choice(subs)]
        if not node:
            continue
        key = rng.choice(list(node))
        op = rng.random()
        if op < 0.15:
            del node[key]
        elif op < 0.25:
            node[key + "x"] = node[key]
        elif op < 0.3:
            node[key] = [[[[]]]] * 3
        else:
            node[key] = _mutate_value(rng, node[key])
    return obj


def _mutate(rng: random.Random, folder: Path) -> str:
    """Corrupt one thing in ``folder`` in place; returns what was done (for messages)."""
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    data = weights.read_bytes()
    kind = rng.choice(
        ["bytes", "truncate", "extend", "header-length", "header-json", "config-json", "config"]
    )
    if kind == "bytes":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            # mostly the header, where structure lives
            end = len(b) if rng.random() < 0.3 else min(len(b), 8 + 400)
            b[rng.randrange(end)] = rng.randrange(256)
        weights.write_bytes(bytes(b))
    elif kind == "truncate":
        weights.write_bytes(data[: rng.randrange(len(data))])
    elif kind == "extend":
        weights.write_bytes(data + bytes(rng.randrange(1, 64)))
    elif kind == "header-length":
        n = rng.choice([0, 1, 7, len(data), 2**32, 2**63, struct.unpack("<Q", data[:8])[0] + 1])
        weights.write_bytes(struct.pack("<Q", n % 2**64) + data[8:])
    elif kind == "header-json":
        header, body = _split(data)
        weights.write_bytes(_join(_mutate_json(rng, header), body))
    elif kind == "config-json":
        cfg = json.loads(config.read_text())
        config.write_text(json.dumps(_mutate_json(rng, cfg)))
    else:
        text = config.read_text()
        cut = rng.randrange(len(text))
        config.write_text(rng.choice([text[:cut], text[:cut] + "{" * 50, "[" * 5000, "null"]))
    return kind


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def test_mutated_folders_fail_cleanly_or_load(tmp_path):
    import shutil

    import torch

    seeds = _seed_folders(tmp_path)
    rng = random.Random(20261201)
    rss_before = _max_rss_bytes()
    outcomes = {"ValueError": 0, "loaded": 0}
    for i in range(CASES):
        case = tmp_path / f"case-{i}"
        shutil.copytree(rng.choice(seeds), case)
        kind = _mutate(rng, case)
        start = time.perf_counter()
        try:
            adapter = load_adapter(case, base_dims=DIMS)
            for folded in adapter.fold(dtype=torch.float64).values():
                for t in (*folded.B, *(a for a in folded.A if a is not None)):
                    assert torch.isfinite(t).all(), (i, kind)
            outcomes["loaded"] += 1
        except ValueError as e:
            assert str(e), (i, kind)
            outcomes["ValueError"] += 1
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {i} ({kind}): {type(e).__name__}: {e}")
        elapsed = time.perf_counter() - start
        assert elapsed < SECONDS_PER_CASE, f"case {i} ({kind}) took {elapsed:.1f} s"
        shutil.rmtree(case)
    # The files are a few KB: a reader that allocated what a mutated header claims would not.
    assert _max_rss_bytes() - rss_before < 256 * 2**20
    # The mutator does reach both outcomes (a fuzzer that only breaks files tests little).
    assert outcomes["ValueError"] > CASES // 2 and outcomes["loaded"] > 0, outcomes
