"""Start-up precheck of an adapter folder against the base it will be served on (no vLLM).

vLLM aborts start-up when one ``--lora-modules`` entry fails to load, so ``moka-serve`` leaves
out, with one warning line each, the folders the engine would refuse: a broken format, module
shapes of another base, layers the base does not have, MoKA components or factors over the bank
limits (``moka_core.limits``), a LoRA rank over ``--max-lora-rank``, non-finite values. These
are the rules the plugin's loader applies in the engine (``plugin/lora_model.py``); a folder left
out can still be requested later and then gets the engine's own error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from moka_core.adapter_format import (
    config_kind,
    first_non_finite,
    load_adapter,
    read_config_json,
)
from moka_core.limits import bank_limits, kernel_entries

Dims = Mapping[str, tuple[int, int]]
_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>A|B)\.weight$")
DEFAULT_MAX_LORA_RANK = 16  # vLLM's default for --max-lora-rank


def base_shape(base: str | Path) -> tuple[dict[str, tuple[int, int]], int] | None:
    """Projection dims and layer count of a local Llama-style base, or None if unknown."""
    from moka_core.base_models import llama_dims

    try:
        return llama_dims(base)
    except (OSError, KeyError, TypeError, ValueError):
        return None


def folder_problem(
    folder: Path,
    base: tuple[Dims, int] | None = None,
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK,
) -> str | None:
    """Why ``folder`` cannot be served on ``base`` (``(dims, layers)``), or None."""
    try:
        cfg = read_config_json(folder / "adapter_config.json")
        peft_type = config_kind(cfg)
        if peft_type == "MOKA":
            return _moka_problem(folder, base)
        if peft_type == "LORA":
            return _lora_problem(folder, cfg, base, max_lora_rank)
        return f"unsupported peft_type {peft_type!r}"
    except ValueError as e:
        return str(e)


def _layer_problem(module: str, layers: int) -> str | None:
    m = _LAYER_INDEX.search(module)
    if m and int(m.group(1)) >= layers:
        return f"module {module!r} does not exist in this base model ({layers} layers)"
    return None


def moka_limit_problem(
    module: str, A: list[torch.Tensor | None], B: list[torch.Tensor]
) -> str | None:
    """Why one module of a MoKA adapter exceeds the bank limits (``moka_core.limits``), or
    None. The one rule for the start-up precheck and the engine's loader.

    Components count as the kernels store them: all rank-1 components of a module (``(m, 1)
    (x) (1, n)``, ``moka-train``'s ``mixed`` family) are one low-rank entry, so a rank-8-sized
    ``mixed`` adapter is two entries, not eight. The factor cap holds per component."""
    max_components, max_numel = bank_limits()
    identity = any(a is None for a in A)
    shapes = [(*(b.shape if a is None else a.shape), *b.shape) for a, b in zip(A, B, strict=True)]
    terms = kernel_entries(shapes, identity_a=identity)
    if terms > max_components:
        return (
            f"module {module!r}: {terms} components exceed the limit of {max_components} per "
            "module (MOKA_MAX_COMPONENTS; a module's rank-1 components count as one)"
        )
    for name, factors in (("A", A), ("B", B)):
        for t in factors:
            if t is not None and t.numel() > max_numel:
                return (
                    f"module {module!r}: {name} has {t.numel()} elements, the bank's buffer "
                    f"holds {max_numel} (MOKA_MAX_FACTOR_NUMEL)"
                )
    return None


def update_size_problem(
    module: str,
    terms: Iterable[tuple[torch.Tensor | None, torch.Tensor]],
    dtype: torch.dtype = torch.float32,
) -> str | None:
    """Why a module's update could overflow ``dtype`` in the model, or None. The one rule for
    the start-up precheck and the engine's loader.

    ``terms`` are the folded factor pairs ``(A, B)`` of ``delta_W = sum kron(A, B)`` (A None:
    the identity), a LoRA's ``(scaling * lora_B, lora_A)`` one pair. On a unit-norm input
    ``|delta_W x| <= sum ||A||_2 ||B||_2 <= sum ||A||_F ||B||_F`` (the identity's norm is 1),
    a bound that costs one pass over the factors. The update lands in the residual stream, which
    the next RMSNorm squares, so the bound must stay under the square root of ``dtype``'s
    largest value (1.8e19 for float32 and bfloat16); any real adapter is many orders below it,
    and one over it (``scaling: 1e30``) would answer with overflowed garbage.
    """
    bound = 0.0
    for a, b in terms:
        a_norm = 1.0 if a is None else float(torch.linalg.vector_norm(a.double()))
        bound += a_norm * float(torch.linalg.vector_norm(b.double()))
    return update_bound_problem(module, bound, dtype)


def update_bound_problem(module: str, bound: float, dtype: torch.dtype) -> str | None:
    """:func:`update_size_problem`'s verdict on a bound already computed (the server's loader
    computes every module's at once, ``moka_core.adapter_format.FoldedGroup.update_bounds``)."""
    limit = math.sqrt(torch.finfo(dtype).max)
    if bound <= limit:
        return None
    return (
        f"module {module!r}: its update can reach {bound:.3g} on a unit-norm input, over the "
        f"{limit:.3g} that {str(dtype).removeprefix('torch.')} keeps finite once squared (the "
        "next layer norm squares it); check the adapter's scaling"
    )


def lora_shape_problem(
    module: str,
    a_shape: tuple[int, ...] | None,
    b_shape: tuple[int, ...] | None,
    out_f: int,
    in_f: int,
    rank: int | None = None,
) -> str | None:
    """Why a LoRA module's ``lora_A``/``lora_B`` do not fit an ``out_f x in_f`` base layer or
    the ``rank`` its config gives it (None: not checked), or None. The one rule for the
    start-up precheck and the engine's loader; a factor that is absent or not a matrix is left
    to vLLM's own rules. A rank other than the config's would be served with the wrong
    ``lora_alpha / r`` scaling (PEFT itself refuses such a checkpoint)."""
    a = a_shape if a_shape is not None and len(a_shape) == 2 else None
    b = b_shape if b_shape is not None and len(b_shape) == 2 else None
    if rank is not None and a is not None and a[0] != rank:
        return f"{module!r}: lora_A {tuple(a)} has rank {a[0]}, the adapter's config says r={rank}"
    if (
        (a is None or a[1] == in_f)
        and (b is None or b[0] == out_f)
        and (a is None or b is None or a[0] == b[1])
    ):
        return None
    return (
        f"{module!r}: lora_A {tuple(a_shape)} / lora_B {tuple(b_shape)} do not fit this base's "
        f"{out_f}x{in_f} layer (an adapter for another model?)"
    )


def _moka_problem(folder: Path, base: tuple[Dims, int] | None) -> str | None:
    adapter = load_adapter(folder, base_dims=None if base is None else base[0])
    for module, w in adapter.modules.items():
        if base is not None and (problem := _layer_problem(module, base[1])):
            return problem
        if problem := moka_limit_problem(module, w.A, w.B):
            return problem
    for group in adapter.fold_groups(dtype=torch.float64):
        for module, bound in zip(group.paths, group.update_bounds().tolist(), strict=True):
            if problem := update_bound_problem(module, bound, torch.float32):
                return problem
    return None


def _lora_problem(
    folder: Path, cfg: dict, base: tuple[Dims, int] | None, max_lora_rank: int
) -> str | None:
    ranks = [cfg.get("r", 8), *dict(cfg.get("rank_pattern") or {}).values()]
    if any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
        return f"LoRA rank {ranks} is not a positive integer"
    if max(ranks) > max_lora_rank:
        return f"LoRA rank {max(ranks)} is greater than max_lora_rank {max_lora_rank}"
    file = folder / "adapter_model.safetensors"
    if not file.is_file():
        if (folder / "adapter_model.bin").is_file():
            return None  # pickled weights: only vLLM reads them
        return "LoRA folder without adapter_model.safetensors"
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        return f"{file.name} is unreadable (truncated or corrupt): {e}"
    bad = first_non_finite({k: t for k, t in tensors.items() if t.is_floating_point()})
    if bad is not None:
        return f"tensor {bad!r} has non-finite values (NaN or Inf)"
    pairs: dict[str, dict[str, torch.Tensor]] = {}  # module -> {"A": lora_A, "B": lora_B}
    for key, t in tensors.items():
        if m := _LORA_KEY.match(key):
            pairs.setdefault(m["module"], {})[m["kind"]] = t
    alpha = cfg.get("lora_alpha", 8)
    if (
        isinstance(alpha, (int, float))
        and not isinstance(alpha, bool)
        and not cfg.get("alpha_pattern")
    ):
        scale = alpha / (math.sqrt(ranks[0]) if cfg.get("use_rslora") else ranks[0])
        for module, ab in pairs.items():
            if "A" in ab and "B" in ab:
                if problem := update_size_problem(module, [(scale * ab["B"].double(), ab["A"])]):
                    return problem
    if base is None:
        return None
    # With a rank_pattern the rank depends on the module: left to the engine's loader.
    rank = None if cfg.get("rank_pattern") else ranks[0]
    for module, ab in pairs.items():
        if problem := _layer_problem(module, base[1]):
            return problem
        dims = base[0].get(module.rsplit(".", 1)[-1])
        a_shape, b_shape = (tuple(ab[k].shape) if k in ab else None for k in ("A", "B"))
        if dims is not None and (
            problem := lora_shape_problem(module, a_shape, b_shape, *dims, rank)
        ):
            return problem
    return None
