"""``moka-bench soak``: many streams over many adapters while a fault injector changes the disk.

What an operator fears from a multi-adapter server is not a slow token but a dead engine: an
adapter re-saved while it is served, a truncated upload, a deleted folder, a load or unload in
the middle of traffic. This command serves ``--num-moka`` + ``--num-lora`` seeded random
adapters from one folder (``moka-serve --adapters DIR``, so the resolver finds them again after an
unload) with few device and CPU slots (constant eviction), keeps ``--streams`` requests in flight
for ``--duration`` seconds, and meanwhile a fault injector picks one of the "faulty" adapters
every ``--fault-interval`` seconds and breaks its folder (NaN weights, truncated weights, deleted
folder, broken or foreign config), restores it, adds a new adapter folder, or unloads and reloads
it through ``/v1/unload_lora_adapter`` and ``/v1/load_lora_adapter`` (admin calls: the server is
started with a fresh admin key, which they carry).

It passes when the engine never dies (``/health`` polled every 2 s), no request for a base or an
untouched adapter fails, every failure is a 4xx for an adapter whose folder was broken at some
moment while the request ran (or a 404 for one being unloaded over HTTP meanwhile, as plain vLLM
answers a request that races an unload), no admin call gets a 5xx or is refused (401/403), and every (adapter, prompt) pair always
gets the same greedy text (what was served is what was validated). Resident memory of the server's
processes is sampled every ``--rss-interval`` seconds; the report gives start, end and the slope
over the second half. Results: ``<out>.json`` and ``<out>.md``; exit status 1 when it failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import secrets
import shlex
import shutil
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moka_core.adapter_format import config_kind
from moka_core.admin_access import ADMIN_HEADER

from .report import machine
from .server import children_rss_bytes, free_port, running_server

BREAKS = ("nan", "truncate", "delete", "bad_json", "other_base")
# Weighted so that folders are broken about half of the time.
ACTIONS = (*BREAKS, "restore", "restore", "restore", "add", "reload", "unload")
PROMPTS_PER_ADAPTER = 2


def add_soak_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("soak")
    g.add_argument("--base", default=None, help="base model folder (default: SmolLM2-135M)")
    g.add_argument("--quantize", choices=["none", "4bit"], default="none")
    g.add_argument("--dtype", default="float32")
    g.add_argument("--num-moka", type=int, default=150)
    g.add_argument("--num-lora", type=int, default=50)
    g.add_argument("--lora-rank", type=int, default=8)
    g.add_argument("--targets", default="q_proj,v_proj")
    g.add_argument("--moka-components", type=int, default=4)
    g.add_argument("--streams", type=int, default=64, help="requests kept in flight")
    g.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    g.add_argument("--max-loras", type=int, default=4)
    g.add_argument("--max-cpu-loras", type=int, default=16)
    g.add_argument("--max-tokens", type=int, default=8)
    g.add_argument("--base-fraction", type=float, default=0.1, help="requests to the base")
    g.add_argument("--faulty-fraction", type=float, default=0.2, help="adapters faults touch")
    g.add_argument("--fault-interval", type=float, default=1.0,
                   help="seconds between faults; 0: no faults")  # fmt: skip
    g.add_argument("--rss-interval", type=float, default=10.0)
    g.add_argument("--max-model-len", type=int, default=256)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--adapters-cache", type=Path, default=None, help="where pristine copies live")
    g.add_argument("--out", type=Path, default=Path("benchmarks/results/soak"))
    g.add_argument("--start-timeout", type=float, default=900.0)
    g.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    g.add_argument("--server-arg", action="append", default=[], help="extra vLLM option")


@dataclass
class Outcome:
    """One request or admin call: its model, window, HTTP status (200 ok, None: no answer)."""

    model: str
    start: float
    end: float
    status: int | None
    error: str = ""
    prompt: int = -1
    text: str = ""


@dataclass
class FolderHistory:
    """When each faulty folder was broken: ``[(t, broken)]`` in time order, per name."""

    changes: dict[str, list[tuple[float, bool]]] = field(default_factory=dict)

    def mark(self, name: str, broken: bool) -> None:
        self.changes.setdefault(name, []).append((time.monotonic(), broken))

    def broken_during(self, name: str, start: float, end: float) -> bool:
        state = False
        for t, broken in self.changes.get(name, []):
            if t > end:
                break
            if t < start:
                state = broken
            elif broken:
                return True
        return state


class FaultInjector:
    """Breaks, restores and adds adapter folders; unloads and reloads adapters over HTTP."""

    def __init__(self, served: Path, pristine: Path, faulty: list[str], rng: random.Random):
        self.served, self.pristine, self.faulty, self.rng = served, pristine, faulty, rng
        self.history = FolderHistory()
        # When each adapter was being unloaded (or unloaded and reloaded) over HTTP: a request
        # racing that may get 404, as in plain vLLM (the server checks the name, then looks it
        # up again, and the unload can fall in between).
        self.unloads = FolderHistory()
        self.actions: Counter[str] = Counter()
        self.added: list[str] = []
        # The server's admin credential: the unloads and reloads are admin calls.
        self.admin_key = secrets.token_urlsafe(16)

    def _restore(self, name: str, source: str | None = None) -> None:
        tmp = self.served / f".{name}.restore"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.pristine / (source or name), tmp)
        shutil.rmtree(self.served / name, ignore_errors=True)
        tmp.rename(self.served / name)

    def break_folder(self, name: str, how: str) -> None:
        """Break ``name``'s folder in place, as a crashed or half-finished save would."""
        folder = self.served / name
        weights = folder / "adapter_model.safetensors"
        if how == "delete":
            shutil.rmtree(folder, ignore_errors=True)
            return
        self._restore(name)  # each break starts from the valid folder
        if how == "truncate":
            with open(weights, "r+b") as f:
                f.truncate(weights.stat().st_size // 2)
        elif how == "nan":
            from safetensors.torch import load_file, save_file

            tensors = load_file(str(weights))
            key = sorted(tensors)[self.rng.randrange(len(tensors))]
            tensors[key] = tensors[key].clone().fill_(float("nan"))
            save_file(tensors, str(weights))  # rewritten in place, as a re-save would
        elif how == "bad_json":
            (folder / "adapter_config.json").write_text('{"peft_type": "MO', encoding="utf-8")
        elif how == "other_base":
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            if config_kind(cfg) == "MOKA":
                for t in cfg["targets"].values():
                    t["in_features"] *= 2
            else:
                cfg["r"] = cfg["r"] * 2  # the weights no longer match the config
            (folder / "adapter_config.json").write_text(json.dumps(cfg), encoding="utf-8")

    async def run(self, url: str, deadline: float, interval: float, admin: list[Outcome]) -> None:
        import httpx

        if interval <= 0:
            return  # a soak without faults (e.g. to watch memory under load alone)
        headers = {ADMIN_HEADER: self.admin_key}
        async with httpx.AsyncClient(base_url=url, timeout=120, headers=headers) as client:
            while True:
                await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))
                if time.monotonic() >= deadline:
                    return
                name = self.rng.choice(self.faulty)
                how = self.rng.choice(ACTIONS)
                self.actions[how] += 1
                if how in BREAKS:
                    self.history.mark(name, True)
                    await asyncio.to_thread(self.break_folder, name, how)
                elif how == "restore":
                    # The folder is missing for a moment while it is replaced: a 404 then is
                    # right, so the window counts as broken.
                    self.history.mark(name, True)
                    await asyncio.to_thread(self._restore, name)
                    self.history.mark(name, False)
                elif how == "add":
                    new = f"added-{len(self.added):04d}"
                    await asyncio.to_thread(self._restore, new, name)
                    self.added.append(new)
                else:
                    calls = [("/v1/unload_lora_adapter", {"lora_name": name})]
                    if how == "reload":
                        calls.append(
                            (
                                "/v1/load_lora_adapter",
                                {"lora_name": name, "lora_path": str(self.served / name)},
                            )
                        )
                    self.unloads.mark(name, True)
                    for path, body in calls:
                        t0 = time.monotonic()
                        try:
                            r = await client.post(path, json=body)
                            status, text = r.status_code, r.text[:300]
                        except httpx.HTTPError as e:
                            status, text = None, f"{type(e).__name__}: {e}"
                        admin.append(Outcome(f"{path} {name}", t0, time.monotonic(), status, text))
                    self.unloads.mark(name, False)


def _pick(rng: random.Random, names: list[str], base_fraction: float, base: str) -> str:
    return base if rng.random() < base_fraction else rng.choice(names)


async def _stream(client, k: int, args, state: dict, out: list[Outcome]) -> None:
    import openai

    rng = random.Random(args.seed * 100_003 + k)
    while time.monotonic() < state["deadline"]:
        names = state["names"] + state["injector"].added
        model = _pick(rng, names, args.base_fraction, state["base_name"])
        prompt = rng.randrange(PROMPTS_PER_ADAPTER)
        ids = random.Random(zlib.crc32(f"{model}/{prompt}".encode())).sample(range(10, 1000), 12)
        t0 = time.monotonic()
        try:
            r = await client.completions.create(
                model=model,
                prompt=ids,
                max_tokens=args.max_tokens,
                temperature=0.0,
                extra_body={"ignore_eos": True},
            )
            o = Outcome(model, t0, time.monotonic(), 200, prompt=prompt, text=r.choices[0].text)
        except openai.APIStatusError as e:
            o = Outcome(model, t0, time.monotonic(), e.status_code, str(e)[:300])
        except Exception as e:  # noqa: BLE001 - a lost answer is a result, never a crash
            o = Outcome(model, t0, time.monotonic(), None, f"{type(e).__name__}: {e}"[:300])
        out.append(o)


async def _health(url: str, deadline: float, log: list[tuple[float, int | None]]) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            try:
                status = (await client.get(f"{url}/health")).status_code
            except httpx.HTTPError:
                status = None
            log.append((time.monotonic(), status))
            await asyncio.sleep(2.0)


async def _rss(deadline: float, interval: float, samples: list[tuple[float, float]]) -> None:
    while True:
        samples.append((time.monotonic(), children_rss_bytes() / 2**20))
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(min(interval, max(0.0, deadline - time.monotonic())))


async def soak(url: str, args, names: list[str], base_name: str, injector: FaultInjector) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                timeout=args.timeout)  # fmt: skip
    t0 = time.monotonic()
    deadline = t0 + args.duration
    state = {"deadline": deadline, "names": names, "base_name": base_name, "injector": injector}
    requests: list[Outcome] = []
    admin: list[Outcome] = []
    health: list[tuple[float, int | None]] = []
    rss: list[tuple[float, float]] = []
    try:
        await asyncio.gather(
            *(_stream(client, k, args, state, requests) for k in range(args.streams)),
            injector.run(url, deadline, args.fault_interval, admin),
            _health(url, deadline, health),
            _rss(deadline, args.rss_interval, rss),
        )
    finally:
        await client.close()
    return {"t0": t0, "requests": requests, "admin": admin, "health": health, "rss": rss}


def verdict(
    run: dict,
    faulty: set[str],
    history: FolderHistory,
    wall_s: float,
    unloads: FolderHistory | None = None,
) -> dict:
    """The report's figures and whether the soak passed (see the module docstring)."""
    reqs: list[Outcome] = run["requests"]
    failed = [r for r in reqs if r.status != 200]
    unexpected = [
        r
        for r in failed
        if r.status is None
        or r.status >= 500
        or r.model not in faulty
        or not (
            history.broken_during(r.model, r.start, r.end)
            or (r.status == 404 and unloads is not None
                and unloads.broken_during(r.model, r.start, r.end))
        )
    ]  # fmt: skip
    texts: dict[tuple[str, int], set[str]] = {}
    for r in reqs:
        if r.status == 200:
            texts.setdefault((r.model, r.prompt), set()).add(r.text)
    mismatched = sorted(f"{m} prompt {p}" for (m, p), t in texts.items() if len(t) > 1)
    admin_5xx = [a for a in run["admin"] if a.status is None or a.status >= 500]
    # The soak's admin calls carry the server's admin key: a 401/403 means the gate is wrong.
    admin_refused = [a for a in run["admin"] if a.status in (401, 403)]
    unhealthy = [(round(t - run["t0"], 1), s) for t, s in run["health"] if s != 200]
    rss = [(t - run["t0"], mb) for t, mb in run["rss"]]
    half = [s for s in rss if s[0] >= rss[-1][0] / 2] if rss else []
    slope = None
    if len(half) >= 2 and half[-1][0] > half[0][0]:
        import numpy as np

        x, y = np.array([s[0] for s in half]), np.array([s[1] for s in half])
        slope = float(np.polyfit(x / 60.0, y, 1)[0])
    ok = [r for r in reqs if r.status == 200]
    figures = {
        "requests_sent": len(reqs),
        "requests_ok": len(ok),
        "requests_failed": len(failed),
        "failed_for_broken_adapters": len(failed) - len(unexpected),
        "unexpected_failures": len(unexpected),
        "failure_statuses": dict(Counter(str(r.status) for r in failed)),
        "mismatched_outputs": len(mismatched),
        "admin_calls": len(run["admin"]),
        "admin_statuses": dict(Counter(str(a.status) for a in run["admin"])),
        "admin_5xx": len(admin_5xx),
        "admin_refused": len(admin_refused),
        "unhealthy_polls": len(unhealthy),
        "server_restarts": 0,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "rss_start_mb": rss[0][1] if rss else None,
        "rss_end_mb": rss[-1][1] if rss else None,
        "rss_max_mb": max(s[1] for s in rss) if rss else None,
        "rss_slope_second_half_mb_per_min": slope,
    }
    figures["passed"] = not (unexpected or admin_5xx or admin_refused or unhealthy or mismatched)
    examples = {
        "unexpected_failures": [vars(r) for r in unexpected[:10]],
        "expected_failures": [vars(r) for r in failed if r not in unexpected][:10],
        "admin_5xx": [vars(a) for a in admin_5xx[:10]],
        "admin_refused": [vars(a) for a in admin_refused[:10]],
        "unhealthy": unhealthy[:10],
        "mismatched": mismatched[:10],
    }
    return {"figures": figures, "examples": examples, "rss_samples": rss}


def soak_markdown(report: dict) -> str:
    f = report["figures"]
    cfg = report["config"]
    rows = [
        ("passed", f["passed"]),
        (
            "requests sent / ok / failed",
            f"{f['requests_sent']} / {f['requests_ok']} / {f['requests_failed']}",
        ),  # fmt: skip
        ("failures, all for broken adapters", f["failed_for_broken_adapters"]),
        ("unexpected failures (valid adapter, base, 5xx, no answer)", f["unexpected_failures"]),
        ("failure statuses", f["failure_statuses"]),
        ("(adapter, prompt) pairs with more than one greedy text", f["mismatched_outputs"]),
        ("admin calls (unload/load) and statuses", f"{f['admin_calls']} {f['admin_statuses']}"),
        ("fault actions", report["fault_actions"]),
        ("unhealthy /health polls (engine deaths)", f["unhealthy_polls"]),
        ("server restarts", f["server_restarts"]),
        ("requests/s", f"{f['requests_per_s']:.2f}"),
        (
            "server RSS start / end / max MB",
            f"{f['rss_start_mb']:.0f} / {f['rss_end_mb']:.0f} / {f['rss_max_mb']:.0f}",
        ),  # fmt: skip
        (
            "RSS slope over the second half, MB/min",
            "-"
            if f["rss_slope_second_half_mb_per_min"] is None
            else f"{f['rss_slope_second_half_mb_per_min']:.1f}",
        ),  # fmt: skip
    ]
    head = [
        f"`{report['command']}`  ",
        f"{report['machine']['processor']}, {report['machine']['cpus']} cpus; base "
        f"{Path(report['base']).name}, {cfg['dtype']}; {cfg['num_moka']} MoKA + {cfg['num_lora']} "
        f"LoRA-{cfg['lora_rank']} adapters ({len(report['faulty'])} faulty); {cfg['streams']} "
        f"streams for {cfg['duration']:.0f} s; --max-loras {cfg['max_loras']} --max-cpu-loras "
        f"{cfg['max_cpu_loras']}",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    return "\n".join(head + [f"| {k} | {v} |" for k, v in rows]) + "\n"


def cmd_soak(args: argparse.Namespace) -> int:
    from moka_core.base_models import cache_dir, llama_dims, materialize_default_base
    from moka_serve.cli import build_command, build_parser

    from .compare import moka_shapes, write_adapters
    from .serve import BenchError

    if args.streams < 1 or args.duration <= 0 or args.num_moka + args.num_lora < 1:
        raise BenchError("need --streams >= 1, --duration > 0 and at least one adapter")
    base = Path(args.base) if args.base else materialize_default_base()
    dims, layers = llama_dims(base)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    shapes = {"moka-kron": moka_shapes(dims, layers, targets, "moka-kron", args.moka_components)}
    spec = {"dims": dims, "layers": layers, "targets": targets, "shapes": shapes}
    methods = {f"moka-{i:03d}": "moka-kron" for i in range(args.num_moka)}
    methods |= {f"lora-{i:03d}": f"lora{args.lora_rank}" for i in range(args.num_lora)}
    pristine = args.adapters_cache or cache_dir() / "soak-adapters" / base.name
    pristine.mkdir(parents=True, exist_ok=True)
    print(f"# writing {len(methods)} adapters to {pristine} (skipping those already there)")
    write_adapters(pristine, base, methods, spec)
    names = sorted(methods)
    rng = random.Random(args.seed)
    faulty = sorted(rng.sample(names, max(1, round(args.faulty_fraction * len(names)))))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="moka-soak-") as work:
        served = Path(work) / "adapters"
        served.mkdir()
        for n in names:
            shutil.copytree(pristine / n, served / n)
        port = free_port()
        injector = FaultInjector(served, pristine, faulty, random.Random(args.seed + 1))
        serve_args = build_parser().parse_args(
            ["--base", str(base), "--adapters", str(served), "--quantize", args.quantize,
             "--admin-key", injector.admin_key]
        )  # fmt: skip
        rest = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len),
                "--max-num-seqs", str(args.streams), "--max-loras", str(args.max_loras),
                "--max-cpu-loras", str(args.max_cpu_loras), "--max-lora-rank",
                str(max(16, args.lora_rank)), "--seed", "0", "--host", "127.0.0.1",
                "--port", str(port), *args.server_arg]  # fmt: skip
        cmd, env = build_command(serve_args, rest)
        log = args.out.with_suffix(".server.log")
        with running_server(cmd, env, log, port, args.start_timeout) as url:
            print(f"# server up; {args.streams} streams for {args.duration:.0f} s, "
                  f"{len(faulty)} faulty adapters", flush=True)  # fmt: skip
            t_start = time.monotonic()
            run = asyncio.run(soak(url, args, names, str(base), injector))
            wall = time.monotonic() - t_start
    result = verdict(
        run, set(faulty) | set(injector.added), injector.history, wall, injector.unloads
    )
    report = {
        "kind": "moka-bench soak",
        "command": shlex.join(["moka-bench", *sys.argv[1:]]),
        "machine": machine(),
        "base": str(base),
        "config": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"
        },  # fmt: skip
        "faulty": faulty,
        "added": injector.added,
        "fault_actions": dict(injector.actions),
        "wall_s": wall,
        **result,
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    md = soak_markdown(report)
    args.out.with_suffix(".md").write_text(md, encoding="utf-8")
    print(md)
    print(f"wrote {args.out}.json and .md (server log: {log})")
    return 0 if result["figures"]["passed"] else 1
