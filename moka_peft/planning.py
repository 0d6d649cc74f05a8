"""From what a user asks for (target names or ``"all-linear"``, a budget, a shape family) to the
components of every target, on the model at hand.

``MokaModel`` calls :func:`plan` before it injects anything, so ``get_peft_model(model,
MokaPeftConfig(target_modules="all-linear", budget="lora-8"))`` and ``moka-train --budget
lora-8`` give the same adapter: one place holds the defaults (the mixed family, no gate for a
single component, each component starting at a LoRA term's coefficient). A config read from a
format-v1 folder already names its components and is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from moka_core.limits import DEFAULT_MAX_COMPONENTS, DEFAULT_MAX_FACTOR_NUMEL, kernel_entries
from moka_core.shapes import lora_params, parse_budget, parse_shapes, plan_shapes
from moka_peft.config import default_scaling

ALL_LINEAR = "all-linear"


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and subclasses (bitsandbytes Linear4bit/Linear8bitLt are subclasses)."""
    return isinstance(module, nn.Linear)


def find_target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Module path -> linear module, for every linear whose last name part is a target."""
    wanted = set(targets)
    return {
        name: module
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in wanted and is_linear(module)
    }


def all_linear_targets(model: nn.Module) -> list[str]:
    """The names PEFT's ``"all-linear"`` means, as bare target names: every linear layer but the
    output projection (format v1 names targets by their last name part)."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and is_linear(module) and module is not out
    }
    return sorted(names)


def target_dims(model: nn.Module, targets: Sequence[str]) -> tuple[dict, dict]:
    """For each target: ``(out, in)`` of its layers and how many layers it matches.

    ValueError when a target matches no linear layer, or layers of different sizes (the format
    keeps one set of shapes per target name).
    """
    dims: dict[str, tuple[int, int]] = {}
    counts: dict[str, int] = {}
    for path, module in find_target_modules(model, targets).items():
        t = path.rsplit(".", 1)[-1]
        d = (int(module.out_features), int(module.in_features))
        if t in dims and dims[t] != d:
            raise ValueError(
                f"target {t!r} matches layers of different sizes ({dims[t]} and {d} at {path}); "
                "the adapter format needs one size per target name"
            )
        dims[t] = d
        counts[t] = counts.get(t, 0) + 1
    missing = [t for t in targets if t not in dims]
    if missing:
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if is_linear(m) and n}
        )
        raise ValueError(
            f"target modules {missing} match no linear layer of the model; its linear layers "
            f"are named {names}"
        )
    return dims, counts


def count_base_params(model: nn.Module) -> int:
    """Parameters of the base model, counting 4-bit weights by their logical shape."""
    n = 0
    for name, p in model.named_parameters():
        if ".moka_" in name or "lora_" in name:
            continue
        qs = getattr(p, "quant_state", None)
        n += math.prod(qs.shape) if qs is not None else p.numel()
    return n


def serving_notes(shapes: dict) -> list[str]:
    """What ``moka-serve`` needs beyond its default bank limits to serve these shapes."""
    notes = []
    # The server counts a module's rank-1 components as one entry (moka_kernels.group_rank_one).
    r = max(kernel_entries(c.as_list() for c in v) for v in shapes.values())
    if r > DEFAULT_MAX_COMPONENTS:
        notes.append(
            f"{r} components per module: serve with MOKA_MAX_COMPONENTS={r} (moka-serve's "
            f"default is {DEFAULT_MAX_COMPONENTS})"
        )
    numel = max(max(c.m1 * c.n1, c.m2 * c.n2) for v in shapes.values() for c in v)
    if numel > DEFAULT_MAX_FACTOR_NUMEL:
        notes.append(
            f"a factor of {numel} elements: serve with MOKA_MAX_FACTOR_NUMEL={numel} "
            f"(moka-serve's default is {DEFAULT_MAX_FACTOR_NUMEL})"
        )
    return notes


def plan(config, model: nn.Module) -> list[str]:
    """Fill in ``config.targets`` (components and dims), ``gating`` and ``scaling`` for ``model``
    when the config does not name its components yet; return notes for the user (a budget too
    small, bank limits to raise). ValueError for targets or shapes that do not fit the model."""
    if config.targets:
        return []
    targets = config.target_modules
    targets = all_linear_targets(model) if targets == ALL_LINEAR else list(targets)
    dims, counts = target_dims(model, targets)
    budget = None
    if config.budget is not None:
        rank_1 = lora_params(dims, counts, 1)
        budget = parse_budget(str(config.budget), count_base_params(model), rank_1)
    shapes, notes = plan_shapes(
        dims,
        counts,
        num_components=config.components,
        budget=budget,
        explicit=parse_shapes(config.shapes),
        variant=config.variant,
        gating=config.gating,
        family=config.family(),
    )
    r = max(len(v) for v in shapes.values())
    # No gate for a single component: softmax over one logit is 1, the gate would not train.
    config.gating = config.gating and r > 1
    if config.scaling is None:
        config.scaling = default_scaling(r, config.gating)
    config.target_modules = list(dims)
    config.targets = {
        t: {
            "in_features": dims[t][1],
            "out_features": dims[t][0],
            "components": [c.as_list() for c in shapes[t]],
        }
        for t in dims
    }
    config.budget_params = budget
    return notes + serving_notes(shapes)
