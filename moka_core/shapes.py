"""Kronecker shapes for MoKA components: exact factorisations, parsing and automatic choice.

A component of a layer with weight ``(out, in)`` is ``kron(A, B)`` with ``A`` of shape
``(m1, n1)`` and ``B`` of shape ``(m2, n2)``, ``m1 * m2 == out`` and ``n1 * n2 == in``. It stores
``m1*n1 + m2*n2`` parameters (``m2*n2`` for MoKAs, whose ``A`` is the identity), which depends
only on ``p = m1*n1``: ``p + out*in/p``, smallest at ``p = sqrt(out*in)``.

Shape families (``--shape-family``) for automatic shapes:

* ``kron``: distinct, diverse, balanced Kronecker shapes (the first release's only choice):
  full-rank updates, but per parameter they trained worse than LoRA on capacity-bound tasks.
* ``lora``: ``(out, 1, 1, in)`` components only. ``kron`` of an ``out x 1`` column and a
  ``1 x in`` row is a rank-1 outer product, so r of them are exactly a rank-r LoRA (same
  ``r * (out + in)`` parameters, same cost per token).
* ``mixed`` (the default): one balanced Kronecker component (a full-rank term at the price of
  about one rank-1 term) plus rank-1 components filling the rest of the budget. MoKA then
  contains LoRA of one rank less and adds a high-rank term on top.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

from moka_core.adapter_format import ComponentShape


def divisors(n: int) -> list[int]:
    """All positive divisors of ``n`` in increasing order."""
    if n <= 0:
        raise ValueError(f"cannot factor {n}: dimensions must be positive")
    small, large = [], []
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
    return small + large[::-1]


def all_factorisations(
    out_features: int, in_features: int, *, variant: str = "moka", min_factor: int = 2
) -> list[ComponentShape]:
    """Every exact ``(m1, n1, m2, n2)`` for an ``(out, in)`` layer with all factors >= min_factor.

    ``min_factor`` is relaxed to 1 for a dimension that has no other split (a prime, or 1).
    For variant ``mokas`` only ``m1 == n1`` (a square identity A) is allowed.
    """

    def splits(n: int) -> list[int]:
        ds = [d for d in divisors(n) if d >= min_factor and n // d >= min_factor]
        return ds or divisors(n)

    shapes = []
    for m1 in splits(out_features):
        for n1 in splits(in_features):
            if variant == "mokas" and m1 != n1:
                continue
            shapes.append(ComponentShape(m1, n1, out_features // m1, in_features // n1))
    if not shapes and variant == "mokas":
        common = [d for d in divisors(math.gcd(out_features, in_features))]
        shapes = [
            ComponentShape(k, k, out_features // k, in_features // k)
            for k in common
            if k > 1 or len(common) == 1
        ]
    return shapes


def component_params(c: ComponentShape, variant: str = "moka") -> int:
    return c.num_params(identity_a=variant == "mokas")


def module_params(components: Sequence[ComponentShape], variant: str, gating: bool) -> int:
    """Trainable parameters of one adapted module (gate logits included)."""
    return sum(component_params(c, variant) for c in components) + (
        len(components) if gating else 0
    )


MAX_ASPECT = 8.0


def _aspect(c: ComponentShape) -> float:
    """The larger aspect ratio (long side / short side) of the two factors."""
    return max(c.m1 / c.n1, c.n1 / c.m1, c.m2 / c.n2, c.n2 / c.m2)


def _distance(a: ComponentShape, b: ComponentShape) -> float:
    """How different two shapes are (log scale, on both factors); 0 for the same shape."""
    return math.dist(
        (math.log(a.m1), math.log(a.n1)),
        (math.log(b.m1), math.log(b.n1)),
    )


def choose_components(
    out_features: int,
    in_features: int,
    num_components: int,
    budget: float,
    *,
    variant: str = "moka",
    gating: bool = True,
) -> tuple[list[ComponentShape], bool]:
    """Pick ``num_components`` distinct, diverse shapes for one module within ``budget`` params.

    Greedy: among shapes whose cost fits the per-component share of the budget, start from the
    most expressive (largest) one and repeatedly add the candidate that is farthest (in log
    shape space) from those already chosen, preferring larger ones on ties. Returns the shapes
    and whether they fit the budget; when even the cheapest distinct shapes do not fit, those
    are returned with ``False`` so the caller can say so.
    """
    if num_components < 1:
        raise ValueError(f"the number of components must be >= 1, got {num_components}")
    cands = all_factorisations(out_features, in_features, variant=variant)
    # Prefer genuinely two-sided products: a 1-wide factor makes kron a plain outer structure.
    if len(cands) < num_components:
        cands = all_factorisations(out_features, in_features, variant=variant, min_factor=1)
    if len(cands) < num_components:
        raise ValueError(
            f"a {out_features}x{in_features} layer has only {len(cands)} distinct "
            f"{variant} factorisations, fewer than the {num_components} components asked for"
        )
    # Keep both factors within an aspect ratio of MAX_ASPECT when that leaves enough shapes:
    # a 2x288 factor is "diverse" but wastes the Kronecker structure.
    balanced = [c for c in cands if _aspect(c) <= MAX_ASPECT]
    if len(balanced) >= num_components:
        cands = balanced
    gate = num_components if gating else 0
    share = (budget - gate) / num_components
    cost = {c: component_params(c, variant) for c in cands}
    fitting = [c for c in cands if cost[c] <= share]
    fits = len(fitting) >= num_components
    if not fits:
        pool = sorted(cands, key=lambda c: (cost[c], c.as_list()))
        pool = [c for c in pool if cost[c] <= cost[pool[num_components - 1]]]
    else:
        # Only consider shapes at least half as large as the best fitting one (when there are
        # enough of them), so that diversity does not come at the price of tiny components.
        best = max(cost[c] for c in fitting)
        pool = [c for c in fitting if cost[c] >= best / 2]
        if len(pool) < num_components:
            pool = sorted(fitting, key=lambda c: -cost[c])[: 4 * num_components]
    # Start from the largest fitting shape (or, over budget, the cheapest), the least lopsided.
    sign = 1 if fits else -1
    chosen = [max(pool, key=lambda c: (sign * cost[c], -_aspect(c), c.as_list()))]
    while len(chosen) < num_components:
        rest = [c for c in pool if c not in chosen]
        nxt = max(
            rest,
            key=lambda c: (min(_distance(c, s) for s in chosen), cost[c], c.as_list()),
        )
        chosen.append(nxt)
    return chosen, fits


_SHAPE_RE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_shapes(specs: Iterable[str]) -> dict[str, list[ComponentShape]]:
    """Parse ``--shapes`` values: ``q_proj=24x24x24x24,12x48x48x12`` (``;`` joins several).

    Each component is ``m1 x n1 x m2 x n2`` (A is m1 x n1, B is m2 x n2). Exactness against the
    layer's dims is checked later by :func:`check_shapes`, once the base model is known.
    """
    out: dict[str, list[ComponentShape]] = {}
    for spec in specs:
        for part in filter(None, (p.strip() for p in spec.split(";"))):
            if "=" not in part:
                raise ValueError(
                    f"--shapes {part!r}: expected TARGET=M1xN1xM2xN2[,M1xN1xM2xN2...], "
                    "e.g. q_proj=24x24x24x24,12x48x48x12"
                )
            target, _, comps = part.partition("=")
            target = target.strip()
            if not target or "." in target:
                raise ValueError(f"--shapes {part!r}: {target!r} is not a module name like q_proj")
            if target in out:
                raise ValueError(f"--shapes gives {target!r} twice")
            shapes = []
            for comp in comps.split(","):
                m = _SHAPE_RE.match(comp)
                if m is None or any(int(v) == 0 for v in m.groups()):
                    raise ValueError(
                        f"--shapes {target}: component {comp.strip()!r} is not M1xN1xM2xN2 "
                        "with positive integers (e.g. 24x24x24x24)"
                    )
                shapes.append(ComponentShape(*(int(v) for v in m.groups())))
            out[target] = shapes
    return out


def check_shapes(
    target: str,
    out_features: int,
    in_features: int,
    shapes: Sequence[ComponentShape],
    variant: str = "moka",
) -> None:
    """Raise a ValueError that explains the first shape that does not factor ``(out, in)``."""
    for i, c in enumerate(shapes):
        if c.m1 * c.m2 != out_features or c.n1 * c.n2 != in_features:
            examples = ", ".join(
                "x".join(map(str, s.as_list()))
                for s in choose_components(out_features, in_features, 2, math.inf, variant=variant)[
                    0
                ]
            )
            raise ValueError(
                f"--shapes {target} component {i} ({'x'.join(map(str, c.as_list()))}): "
                f"{target} is {out_features}x{in_features} (out x in), so m1*m2 must be "
                f"{out_features} and n1*n2 must be {in_features}; got m1*m2={c.m1 * c.m2}, "
                f"n1*n2={c.n1 * c.n2} (valid examples: {examples})"
            )
        if variant == "mokas" and c.m1 != c.n1:
            raise ValueError(
                f"--shapes {target} component {i}: variant mokas needs m1 == n1 (A is an "
                f"identity), got m1={c.m1}, n1={c.n1}"
            )


# A budget given as a LoRA's rank gets this much more, so that the gate logits (one per
# component and module, a few per thousand of the factors) fit beside a LoRA's parameter count.
BUDGET_SLACK = 1.005


def parse_budget(text: str, base_params: int, lora_rank_1: int | None = None) -> float:
    """``0.1%`` (of the base model's parameters), an absolute count like ``250000`` / ``250k``,
    or ``lora-8``: a rank-8 LoRA's size on the same modules (``lora_rank_1`` parameters per rank,
    plus ``BUDGET_SLACK`` for the gates)."""
    s = text.strip().lower().replace("_", "")
    try:
        if s.startswith("lora-"):
            if lora_rank_1 is None:
                raise ValueError(f"--budget {text!r}: a LoRA-sized budget needs the target modules")
            value = int(s[5:]) * lora_rank_1 * BUDGET_SLACK
        elif s.endswith("%"):
            value = float(s[:-1]) / 100 * base_params
        elif s.endswith("k"):
            value = float(s[:-1]) * 1e3
        elif s.endswith("m"):
            value = float(s[:-1]) * 1e6
        else:
            value = float(s)
    except ValueError as e:
        if "LoRA-sized" in str(e):
            raise
        raise ValueError(
            f"--budget {text!r}: expected a percentage of the base model's parameters "
            "(e.g. 0.1%), a parameter count (e.g. 200000, 200k, 1.5m) or a LoRA's size "
            "(e.g. lora-8)"
        ) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--budget {text!r} must be positive")
    return value


FAMILIES = ("mixed", "lora", "kron")


def rank_one_shape(out_features: int, in_features: int) -> ComponentShape:
    """The LoRA-equivalent component: ``kron(column of out, row of in)``, a rank-1 term."""
    return ComponentShape(out_features, 1, 1, in_features)


def balanced_shape(out_features: int, in_features: int) -> ComponentShape:
    """The cheapest two-sided Kronecker shape (both factors near sqrt size, least lopsided)."""
    return choose_components(out_features, in_features, 1, 0.0)[0][0]


def family_components(
    out_features: int, in_features: int, family: str, num_components: int
) -> list[ComponentShape]:
    """``num_components`` shapes of family ``lora`` or ``mixed`` for one ``(out, in)`` module.

    ``mixed`` with one component is a single rank-1 term: at the size of one rank-1 term a
    balanced Kronecker term costs about the same, and LoRA-like terms are the safer choice.
    """
    if num_components < 1:
        raise ValueError(f"the number of components must be >= 1, got {num_components}")
    one = rank_one_shape(out_features, in_features)
    kron = balanced_shape(out_features, in_features)
    if family == "lora" or num_components == 1 or kron == one:
        return [one] * num_components
    return [kron] + [one] * (num_components - 1)


def plan_shapes(
    layer_dims: Mapping[str, tuple[int, int]],
    module_counts: Mapping[str, int],
    *,
    num_components: int,
    budget: float | None,
    explicit: Mapping[str, Sequence[ComponentShape]] | None = None,
    variant: str = "moka",
    gating: bool = True,
    family: str = "kron",
) -> tuple[dict[str, list[ComponentShape]], list[str]]:
    """Shapes for every target: explicit ones where given, the rest chosen from the budget.

    ``layer_dims`` maps target -> ``(out, in)``; ``module_counts`` how many modules each target
    adapts. The budget (total trainable parameters) is shared by all adapted modules.

    ``family`` ``kron``: ``num_components`` diverse balanced shapes within the budget;
    ``budget=None`` means the cheapest such set. ``lora`` / ``mixed`` (see the module
    docstring): with a budget, the most components per module that fit it, the same count on
    every target as a LoRA has one rank (``num_components`` is ignored); without one,
    ``num_components`` components.
    Returns the shapes and human-readable notes (e.g. that the budget was too small).
    """
    if family not in FAMILIES:
        raise ValueError(f"shape family must be one of {FAMILIES}, got {family!r}")
    if family != "kron" and variant == "mokas":
        raise ValueError("shape families lora and mixed need variant moka (mokas has no A)")
    explicit = dict(explicit or {})
    notes: list[str] = []
    unknown = sorted(set(explicit) - set(layer_dims))
    if unknown:
        raise ValueError(
            f"--shapes names {unknown}, which are not among the targets {sorted(layer_dims)}"
        )
    result: dict[str, list[ComponentShape]] = {}
    for target, (out_f, in_f) in layer_dims.items():
        if target in explicit:
            check_shapes(target, out_f, in_f, explicit[target], variant)
            result[target] = list(explicit[target])
    remaining = [t for t in layer_dims if t not in result]
    if not remaining:
        return result, notes
    used = sum(module_params(result[t], variant, gating) * module_counts.get(t, 0) for t in result)
    if family != "kron":
        # One component count for every target (as a LoRA has one rank): the largest that fits.
        def with_k(k: int) -> tuple[dict[str, list[ComponentShape]], int]:
            got = {t: family_components(*layer_dims[t], family, k) for t in remaining}
            cost = sum(module_params(got[t], variant, gating and k > 1) * module_counts.get(t, 0)
                       for t in remaining)  # fmt: skip
            return got, cost

        left = math.inf if budget is None else budget - used
        k = num_components
        if budget is not None:
            k = 1
            while with_k(k + 1)[1] <= left:
                k += 1
        got, cost = with_k(k)
        if cost > left:
            notes.append(
                f"budget too small: {max(left, 0):,.0f} params left for {sorted(remaining)}, "
                f"one rank-1 component on each needs {cost:,}; using that"
            )
        result.update(got)
        return result, notes
    n_modules = sum(module_counts.get(t, 0) for t in remaining)
    per_module = math.inf if budget is None else (budget - used) / max(n_modules, 1)
    for target in remaining:
        out_f, in_f = layer_dims[target]
        # Without a budget use the cheapest shapes: the smallest diverse set (each balanced).
        # For mokas the cheapest is a huge identity with a tiny B, so give it instead the
        # parameter count of the cheapest moka set (a like-for-like default).
        b = per_module if per_module != math.inf else 0.0
        if per_module == math.inf and variant == "mokas":
            cheapest = choose_components(out_f, in_f, num_components, 0.0, gating=gating)[0]
            b = module_params(cheapest, "moka", gating)
        shapes, fits = choose_components(
            out_f, in_f, num_components, b, variant=variant, gating=gating
        )
        if budget is not None and not fits:
            notes.append(
                f"budget too small for {num_components} components on {target} "
                f"({out_f}x{in_f}): {per_module:,.0f} params per module available, the "
                f"cheapest diverse set needs {module_params(shapes, variant, gating):,}; "
                "using that"
            )
        result[target] = shapes
    return result, notes


def format_shapes(shapes: Sequence[ComponentShape]) -> str:
    return ",".join("x".join(map(str, c.as_list())) for c in shapes)


def plan_lora_sized(
    layer_dims: Mapping[str, tuple[int, int]],
    counts: Mapping[str, int],
    rank: int,
    family: str = "mixed",
) -> dict[str, list[ComponentShape]]:
    """The shapes ``moka-train --budget lora-R`` plans (``family`` ``mixed`` by default: one
    balanced Kronecker term and R-1 rank-1 terms on typical layers)."""
    budget = parse_budget(f"lora-{rank}", 0, lora_params(layer_dims, counts, 1))
    shapes, _ = plan_shapes(layer_dims, counts, num_components=1, budget=budget, family=family)
    return shapes


def lora_params(layer_dims: Mapping[str, tuple[int, int]], counts: Mapping[str, int], rank: int):
    """Trainable parameters of a rank-``rank`` LoRA on the same modules: r*(in+out) each."""
    return sum(rank * (o + i) * counts.get(t, 0) for t, (o, i) in layer_dims.items())
