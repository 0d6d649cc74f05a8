"""MoKA adapter format v1: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

The trainer writes this format and the server reads it, so this module is the single place that
defines and checks it. It imports only torch, safetensors and the stdlib so that it can be used
from either side (and from tests) without vLLM or transformers.

Every malformed input is reported as a ``ValueError`` naming the adapter (or module / tensor) and
the rule that was broken: a server loading adapters at runtime must be able to reject a bad
upload with a readable message instead of crashing on an obscure json/safetensors/torch error.
See ``docs/adapter-format.md`` for the specification.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from moka_kernels import KronEntry
from moka_kernels.bank import group_rank_one, rank_one_shape

FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_TYPE = "MOKA"
VARIANTS = ("moka", "mokas")
ALLOWED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# An adapter is a few MB; anything near this is a mistake or an attack, so refuse to read it.
MAX_ADAPTER_BYTES = 4 * 2**30
# PEFT stores tensors under the wrapper's path; the public API uses the plain module path.
PEFT_PREFIX = "base_model.model."

# safetensors dtype tag -> (torch dtype, bytes per element), for the allowed dtypes only.
_ST_DTYPES = {"F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2)}
# Largest header we are willing to parse; a real one is a few hundred bytes per tensor.
_MAX_HEADER_BYTES = 100 * 2**20
_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?:moka_(?P<kind>A|B)\.(?P<index>0|[1-9][0-9]*)\.weight|moka_gate)$"
)


def _is_int(v: object) -> bool:
    # bool is an int subclass, but ``true`` is never a valid dimension or version.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_pos_int(v: object) -> bool:
    return _is_int(v) and v > 0


@dataclass(frozen=True)
class ComponentShape:
    """Shapes of one Kronecker component: A is (m1, n1), B is (m2, n2)."""

    m1: int
    n1: int
    m2: int
    n2: int

    @property
    def out_features(self) -> int:
        return self.m1 * self.m2

    @property
    def in_features(self) -> int:
        return self.n1 * self.n2

    def num_params(self, identity_a: bool) -> int:
        """Stored parameters; ``identity_a`` (variant mokas) means A is not stored."""
        return (0 if identity_a else self.m1 * self.n1) + self.m2 * self.n2

    def as_list(self) -> list[int]:
        return [self.m1, self.n1, self.m2, self.n2]


@dataclass(frozen=True)
class TargetSpec:
    """Dimensions of the base linear layers named by one target, and its components."""

    in_features: int
    out_features: int
    components: tuple[ComponentShape, ...]


@dataclass
class MokaConfig:
    """Contents of ``adapter_config.json``. Build with ``from_dict`` to get it validated."""

    target_modules: list[str]
    targets: dict[str, TargetSpec]
    gating: bool = True
    scaling: float = 1.0
    variant: str = "moka"
    base_model_name_or_path: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def identity_a(self) -> bool:
        """True for variant mokas, whose A_i are all the identity and are not stored."""
        return self.variant == "mokas"

    def to_dict(self) -> dict:
        return {
            "peft_type": PEFT_TYPE,
            "moka_format_version": self.format_version,
            "base_model_name_or_path": self.base_model_name_or_path,
            "target_modules": list(self.target_modules),
            "targets": {
                name: {
                    "in_features": spec.in_features,
                    "out_features": spec.out_features,
                    "components": [c.as_list() for c in spec.components],
                }
                for name, spec in self.targets.items()
            },
            "gating": self.gating,
            "scaling": self.scaling,
            "variant": self.variant,
        }

    @classmethod
    def from_dict(cls, d: dict) -> MokaConfig:
        """Parse the JSON object of ``adapter_config.json`` and validate it.

        Keys other than the documented ones (PEFT writes e.g. ``task_type``) are ignored.
        """
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        if "peft_type" not in d:
            raise ValueError(f"peft_type is missing, expected {PEFT_TYPE!r}")
        if d["peft_type"] != PEFT_TYPE:
            raise ValueError(f"peft_type is {d['peft_type']!r}, expected {PEFT_TYPE!r}")
        # Check the version before anything else: a future version may change the other fields.
        if "moka_format_version" not in d:
            raise ValueError("moka_format_version is missing")
        version = d["moka_format_version"]
        if not _is_int(version) or version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported moka_format_version {version!r} (this reader supports "
                f"{FORMAT_VERSION})"
            )
        raw_targets = d.get("targets")
        if not isinstance(raw_targets, dict):
            raise ValueError("targets must be an object mapping each target module to its dims")
        target_modules = d.get("target_modules")
        cfg = cls(
            target_modules=list(target_modules)
            if isinstance(target_modules, list)
            else target_modules,
            targets={name: _parse_target(name, spec) for name, spec in raw_targets.items()},
            gating=d.get("gating", True),
            scaling=d.get("scaling", 1.0),
            variant=d.get("variant", "moka"),
            base_model_name_or_path=d.get("base_model_name_or_path", ""),
            format_version=version,
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every config rule; raise ValueError naming the rule and the target."""
        if not _is_int(self.format_version) or self.format_version != FORMAT_VERSION:
            raise ValueError(f"unsupported moka_format_version {self.format_version!r}")
        tm = self.target_modules
        if not (isinstance(tm, list) and tm and all(isinstance(t, str) and t for t in tm)):
            raise ValueError(f"target_modules must be a non-empty list of strings, got {tm!r}")
        if len(set(tm)) != len(tm):
            raise ValueError(f"target_modules has duplicates: {tm!r}")
        for t in tm:
            if "." in t:
                raise ValueError(f"target module {t!r} must be a single name (no dots)")
        if not isinstance(self.targets, dict) or set(self.targets) != set(tm):
            keys = sorted(self.targets) if isinstance(self.targets, dict) else self.targets
            raise ValueError(f"targets keys {keys!r} differ from target_modules {sorted(tm)!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant is {self.variant!r}, expected one of {list(VARIANTS)}")
        if not isinstance(self.gating, bool):
            raise ValueError(f"gating must be true or false, got {self.gating!r}")
        s = self.scaling
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
            raise ValueError(f"scaling must be a finite number, got {s!r}")
        if not isinstance(self.base_model_name_or_path, str):
            raise ValueError("base_model_name_or_path must be a string")
        for name in tm:
            _validate_target(name, self.targets[name], self.identity_a)

    def target_for(self, module_path: str) -> str | None:
        """The target a module path belongs to: its last dotted part, if that is a target."""
        suffix = module_path.rsplit(".", 1)[-1]
        return suffix if suffix in self.targets else None

    def check_base_dims(self, base_dims: Mapping[str, tuple[int, int]]) -> None:
        """Check each target's dims against the base layer's ``(out_features, in_features)``."""
        for name, spec in self.targets.items():
            if name not in base_dims:
                raise ValueError(
                    f"target {name!r} is not a layer of the base model "
                    f"(base_dims has {sorted(base_dims)})"
                )
            out_f, in_f = tuple(base_dims[name])
            if (spec.out_features, spec.in_features) != (out_f, in_f):
                raise ValueError(
                    f"target {name!r}: adapter dims (out={spec.out_features}, "
                    f"in={spec.in_features}) differ from the base layer's (out={out_f}, in={in_f})"
                )


def _parse_target(name: str, spec: object) -> TargetSpec:
    """JSON -> TargetSpec, checking only what construction needs; ``validate`` does the rest."""
    if not isinstance(spec, dict):
        raise ValueError(f"target {name!r} must be an object, got {spec!r}")
    for key in ("in_features", "out_features", "components"):
        if key not in spec:
            raise ValueError(f"target {name!r} lacks {key!r}")
    comps = spec["components"]
    if not isinstance(comps, list):
        raise ValueError(f"target {name!r}: components must be a list of [m1, n1, m2, n2]")
    shapes = []
    for i, c in enumerate(comps):
        if not (isinstance(c, list) and len(c) == 4 and all(_is_pos_int(v) for v in c)):
            raise ValueError(
                f"target {name!r} component {i}: {c!r} is not 4 positive integers [m1, n1, m2, n2]"
            )
        shapes.append(ComponentShape(*c))
    return TargetSpec(spec["in_features"], spec["out_features"], tuple(shapes))


def _validate_target(name: str, spec: TargetSpec, identity_a: bool) -> None:
    if not isinstance(spec, TargetSpec):
        raise ValueError(f"target {name!r} must be a TargetSpec, got {type(spec).__name__}")
    if not (_is_pos_int(spec.in_features) and _is_pos_int(spec.out_features)):
        raise ValueError(
            f"target {name!r}: in_features and out_features must be positive integers, "
            f"got {spec.in_features!r}, {spec.out_features!r}"
        )
    if not spec.components:
        raise ValueError(f"target {name!r}: components is empty")
    for i, c in enumerate(spec.components):
        vals = [c.m1, c.n1, c.m2, c.n2]
        if not all(_is_pos_int(v) for v in vals):
            raise ValueError(
                f"target {name!r} component {i}: {vals!r} is not 4 positive integers "
                "[m1, n1, m2, n2]"
            )
        if c.m1 * c.m2 != spec.out_features:
            raise ValueError(
                f"target {name!r} component {i} {vals}: m1*m2 = {c.m1}*{c.m2} = "
                f"{c.m1 * c.m2} != out_features {spec.out_features}"
            )
        if c.n1 * c.n2 != spec.in_features:
            raise ValueError(
                f"target {name!r} component {i} {vals}: n1*n2 = {c.n1}*{c.n2} = "
                f"{c.n1 * c.n2} != in_features {spec.in_features}"
            )
        if identity_a and c.m1 != c.n1:
            raise ValueError(
                f"target {name!r} component {i} {vals}: variant mokas needs a square identity "
                f"A (m1 == n1), got m1={c.m1}, n1={c.n1}"
            )


def kron_sum(
    shapes,
    a_list: list[torch.Tensor | None] | None,
    b_list: list[torch.Tensor],
    coeff: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The dense update ``sum_i c_i kron(A_i, B_i)`` (``A_i`` None, or no list: the identity of
    MoKAs; no ``coeff``: every c_i = 1) in ``dtype``: the one reference formula that the
    format's readers, the PEFT layer's merge and the tests share (kernels have their own
    ``naive.py`` over a bank)."""
    out = None
    for i, (shape, b) in enumerate(zip(shapes, b_list, strict=True)):
        a = None if a_list is None else a_list[i]
        a = torch.eye(shape.m1, dtype=dtype, device=b.device) if a is None else a.to(dtype)
        term = torch.kron(a, b.to(dtype))
        if coeff is not None:
            term = coeff[i].to(dtype) * term
        out = term if out is None else out + term
    return out


@dataclass
class MokaModuleWeights:
    """Trained tensors of one adapted module; ``A[i]`` is None when it is the identity (mokas)."""

    A: list[torch.Tensor | None]
    B: list[torch.Tensor]
    gate: torch.Tensor | None


@dataclass
class FoldedModule:
    """Inference form: gates and scaling folded into constants, c_i = scaling*alpha_i.

    The serving kernels then compute ``sum_i kron(A_i', B_i') x`` with no softmax or scaling.
    The constant goes into A_i (usually the smaller factor); when A_i is the identity it is not
    stored, so the constant goes into B_i instead.
    """

    shapes: tuple[ComponentShape, ...]
    A: list[torch.Tensor | None]
    B: list[torch.Tensor]

    def kron_entries(self, slice: int = 0) -> list[KronEntry]:
        """The folded components as kernel entries (``moka_kernels.MokaBank.write_slot``), the
        rank-1 ones stacked into one low-rank entry (``moka_kernels.bank.group_rank_one``):
        r rank-1 components then cost the kernels one shrink and one expand, as a rank-r LoRA."""
        terms = [KronEntry(b=b, a=a, slice=slice) for a, b in zip(self.A, self.B, strict=True)]
        return group_rank_one(terms)

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense (out_features, in_features) update, for reference and tests."""
        return kron_sum(self.shapes, self.A, self.B, None, dtype)


@dataclass
class MokaAdapter:
    """A whole adapter in memory: config plus weights keyed by module path (no PEFT prefix)."""

    config: MokaConfig
    modules: dict[str, MokaModuleWeights]

    def validate(self) -> None:
        """Run the config and tensor rules (the same ones ``load_adapter`` applies)."""
        for path, w in self.modules.items():
            if len(w.A) != len(w.B):
                raise ValueError(f"module {path!r}: {len(w.A)} A entries but {len(w.B)} B entries")
        adapter_from_tensors(self.config, tensors_from_adapter(self))

    def num_parameters(self) -> int:
        """Number of stored (trainable) scalars, gates included."""
        n = 0
        for w in self.modules.values():
            n += sum(t.numel() for t in (*w.A, *w.B) if t is not None)
            n += w.gate.numel() if w.gate is not None else 0
        return n

    def _constants(self, w: MokaModuleWeights) -> torch.Tensor:
        """c_i = scaling * alpha_i in float64, alpha = softmax(gate) or ones."""
        if self.config.gating:
            if w.gate is None:
                raise ValueError("gating is true but a module has no gate")
            alpha = torch.softmax(w.gate.to(torch.float64), dim=0)
        else:
            alpha = torch.ones(len(w.B), dtype=torch.float64)
        return self.config.scaling * alpha

    def _module(self, module_path: str) -> tuple[MokaModuleWeights, TargetSpec]:
        if module_path not in self.modules:
            raise ValueError(f"module {module_path!r} is not in this adapter")
        target = self.config.target_for(module_path)
        if target is None:
            raise ValueError(f"module {module_path!r} does not match any target module")
        return self.modules[module_path], self.config.targets[target]

    def delta_weight(self, module_path: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense (out, in) update scaling * sum_i alpha_i kron(A_i, B_i): the reference math."""
        w, spec = self._module(module_path)
        return kron_sum(spec.components, w.A, w.B, self._constants(w), dtype)

    def fold(self, dtype: torch.dtype | None = None) -> dict[str, FoldedModule]:
        """Fold gates and scaling into the factors for inference, module by module: views of
        :meth:`fold_groups`' stacks (see there for ``dtype``)."""
        return {
            path: module
            for group in self.fold_groups(dtype)
            for path, module in group.modules().items()
        }

    def fold_groups(self, dtype: torch.dtype | None = None) -> list[FoldedGroup]:
        """Fold gates and scaling into the factors, every module of a target at once.

        The products are formed in float64 and cast to ``dtype`` (default: the stored dtype,
        the widest one where modules mix dtypes; pass float64 for an exact reference). All
        modules of a target share their component shapes, so each component is one stacked
        tensor over them: a cold load costs a few ops per target, not per stored tensor.
        """
        by_target: dict[str, list[str]] = {}
        for path in self.modules:
            self._module(path)  # raises for a module no target matches
            by_target.setdefault(self.config.target_for(path), []).append(path)
        groups = []
        for target, paths in by_target.items():
            ws = [self.modules[p] for p in paths]
            shapes = self.config.targets[target].components
            if self.config.gating:
                if any(w.gate is None for w in ws):
                    raise ValueError("gating is true but a module has no gate")
                gates = torch.stack([w.gate for w in ws]).to(torch.float64)
                c = self.config.scaling * torch.softmax(gates, dim=1)  # (n, k)
            else:
                c = torch.full(
                    (len(ws), len(shapes)), float(self.config.scaling), dtype=torch.float64
                )
            a_out: list[torch.Tensor | None] = []
            b_out: list[torch.Tensor] = []
            for i in range(len(shapes)):
                b = torch.stack([w.B[i] for w in ws])
                out_dtype = dtype or b.dtype
                ci = c[:, i, None, None]
                if ws[0].A[i] is None:
                    a_out.append(None)
                    b_out.append((ci * b.to(torch.float64)).to(out_dtype))
                else:
                    a = torch.stack([w.A[i] for w in ws])
                    a_out.append((ci * a.to(torch.float64)).to(dtype or a.dtype))
                    b_out.append(b.to(out_dtype))
            groups.append(FoldedGroup(paths, shapes, a_out, b_out))
        return groups


@dataclass
class FoldedGroup:
    """The folded factors of every module of one target, stacked: ``A[i]`` is component i's
    ``(modules, m1, n1)`` (None: the identity), ``B[i]`` its ``(modules, m2, n2)``, module j
    being ``paths[j]`` (:meth:`MokaAdapter.fold_groups`)."""

    paths: list[str]
    shapes: tuple[ComponentShape, ...]
    A: list[torch.Tensor | None]
    B: list[torch.Tensor]

    def modules(self) -> dict[str, FoldedModule]:
        """Each module's :class:`FoldedModule` (views of the stacks)."""
        return {
            path: FoldedModule(
                self.shapes, [None if a is None else a[j] for a in self.A], [b[j] for b in self.B]
            )
            for j, path in enumerate(self.paths)
        }

    def update_bounds(self) -> torch.Tensor:
        """Per module, ``sum_i ||A_i||_F ||B_i||_F`` in float64 (the identity's norm is 1): the
        bound ``moka_core.adapter_check.update_size_problem`` puts on ``|delta_W x|``."""
        bound = torch.zeros(len(self.paths), dtype=torch.float64)
        for a, b in zip(self.A, self.B, strict=True):
            term = torch.linalg.vector_norm(b.to(torch.float64), dim=(1, 2))
            if a is not None:
                term = term * torch.linalg.vector_norm(a.to(torch.float64), dim=(1, 2))
            bound = bound + term
        return bound

    def kron_entries(
        self, dtype: torch.dtype, slices: Mapping[str, int] | None = None
    ) -> dict[str, list[KronEntry]]:
        """Every module's :meth:`FoldedModule.kron_entries` cast to ``dtype``, with the same
        grouping of rank-1 components (``group_rank_one``), formed on the stacks: the order,
        shapes and values are those of the module-by-module path (a test compares them).
        ``slices`` gives a module's output slice (default 0). Raises ``ValueError`` naming the
        first module whose factors overflow ``dtype``."""
        rank_one = [
            i for i, c in enumerate(self.shapes)
            if self.A[i] is not None and rank_one_shape(c.m1, c.n1, c.m2, c.n2)
        ]  # fmt: skip
        low_rank = None
        if rank_one:  # U (n, m, r) and V (n, r, in); (1, n) (x) (m, 1) joins as (b, a)
            cols = [(self.A[i], self.B[i]) if c.n1 == 1 and c.m2 == 1 else (self.B[i], self.A[i])
                    for i, c in ((i, self.shapes[i]) for i in rank_one)]  # fmt: skip
            u = torch.cat([col for col, _ in cols], dim=2).to(dtype)
            v = torch.cat([row for _, row in cols], dim=1).to(dtype)
            low_rank = (u, v)
        cast = [
            (None if a is None else a.to(dtype), b.to(dtype))
            for i, (a, b) in enumerate(zip(self.A, self.B, strict=True))
            if i not in rank_one
        ]  # fmt: skip
        stacks = [t for pair in cast for t in pair if t is not None] + list(low_rank or ())
        finite = torch.ones(len(self.paths), dtype=torch.bool)
        for t in stacks:
            finite &= torch.isfinite(t).flatten(1).all(dim=1)
        if not bool(finite.all()):
            path = self.paths[int((~finite).nonzero()[0])]
            raise ValueError(f"module {path!r}: folded factors overflow {dtype}")
        # Each module's views of the stacks, taken with one ``unbind`` per stack (indexing them
        # module by module costs more than everything else here).
        n = len(self.paths)
        columns = []  # per entry: (a views, b views, rank)
        for i in (i for i in range(len(self.shapes)) if i not in rank_one[1:]):
            if rank_one and i == rank_one[0]:
                u, v = low_rank
                columns.append((u.unbind(0), v.unbind(0), len(rank_one)))
            else:
                a, b = cast.pop(0)
                columns.append(([None] * n if a is None else a.unbind(0), b.unbind(0), 1))
        out = {}
        for j, path in enumerate(self.paths):
            s = 0 if slices is None else slices[path]
            out[path] = [KronEntry(b=b[j], a=a[j], slice=s, rank=r) for a, b, r in columns]
        return out


# --------------------------------------------------------------------------- tensors <-> adapter


def tensors_from_adapter(adapter: MokaAdapter) -> dict[str, torch.Tensor]:
    """Flatten an adapter to the safetensors naming scheme (with the PEFT prefix)."""
    tensors = {}
    for path, w in adapter.modules.items():
        base = PEFT_PREFIX + path
        for i, a in enumerate(w.A):
            if a is not None:
                tensors[f"{base}.moka_A.{i}.weight"] = a
        for i, b in enumerate(w.B):
            tensors[f"{base}.moka_B.{i}.weight"] = b
        if w.gate is not None:
            tensors[f"{base}.moka_gate"] = w.gate
    return tensors


def _expected_shapes(config: MokaConfig, target: str) -> dict[str, tuple[int, ...]]:
    """Slot ("A.0", "B.0", "gate") -> shape, for one module of ``target``."""
    comps = config.targets[target].components
    slots: dict[str, tuple[int, ...]] = {}
    for i, c in enumerate(comps):
        if not config.identity_a:
            slots[f"A.{i}"] = (c.m1, c.n1)
        slots[f"B.{i}"] = (c.m2, c.n2)
    if config.gating:
        slots["gate"] = (len(comps),)
    return slots


def _index_tensors(config: MokaConfig, shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """Map stored tensor names to modules, checking names, completeness and shapes.

    Works on shapes alone so that a file's header can be checked before any data is read.
    Returns module path -> {slot: stored name}.
    """
    modules: dict[str, dict[str, str]] = {}
    expected_by_target: dict[str, dict[str, tuple[int, ...]]] = {}
    target_of: dict[str, str | None] = {}
    for key in sorted(shapes):
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        m = _KEY_RE.match(name)
        if m is None:
            raise ValueError(
                f"unknown tensor {key!r}: expected <module>.moka_A.<i>.weight, "
                "<module>.moka_B.<i>.weight or <module>.moka_gate"
            )
        module = m["module"]
        target = target_of.get(module, "")
        if target == "":
            target = target_of[module] = config.target_for(module)
        if target is None:
            raise ValueError(
                f"unknown tensor {key!r}: module {module!r} does not end in one of "
                f"target_modules {config.target_modules}"
            )
        slot = "gate" if m["kind"] is None else f"{m['kind']}.{m['index']}"
        expected = expected_by_target.get(target)
        if expected is None:
            expected = expected_by_target[target] = _expected_shapes(config, target)
        if slot not in expected:
            if slot == "gate":
                why = "a gate tensor is present but gating is false"
            elif slot.startswith("A.") and config.identity_a:
                why = "variant mokas stores no A tensors (A is the identity)"
            else:
                why = f"target {target!r} has only {len(config.targets[target].components)} components"
            raise ValueError(f"unexpected tensor {key!r}: {why}")
        got = modules.setdefault(module, {})
        if slot in got:
            raise ValueError(f"tensor {key!r} duplicates {got[slot]!r}")
        if tuple(shapes[key]) != expected[slot]:
            raise ValueError(
                f"tensor {key!r} has shape {list(shapes[key])}, expected {list(expected[slot])}"
            )
        got[slot] = key
    if not modules:
        raise ValueError("adapter has no modules (no tensors)")
    for module, got in modules.items():
        missing = [s for s in expected_by_target[target_of[module]] if s not in got]
        if "gate" in missing:
            raise ValueError(f"module {module!r}: gating is true but its moka_gate is missing")
        if missing:
            raise ValueError(f"module {module!r} is missing tensors {missing}")
    return modules


def _layout_index(config: MokaConfig, layout: _Layout) -> dict:
    """``_index_tensors(config, layout.shapes)``, kept in the layout per config (read-only):
    the index depends on nothing else, and adapters sharing a layout mostly share a config."""
    key = (tuple(config.target_modules), tuple(config.targets.items()), config.gating,
           config.identity_a)  # fmt: skip
    index = layout.indexes.get(key)
    if index is None:
        index = _index_tensors(config, layout.shapes)
        if len(layout.indexes) >= _MAX_LAYOUTS:
            del layout.indexes[next(iter(layout.indexes))]
        layout.indexes[key] = index
    return index


def first_non_finite(named: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first tensor holding NaN or Inf, or None; one pass over all the values
    (a per-tensor check costs more in calls than in arithmetic for thousands of small tensors)."""
    by_dtype: dict[torch.dtype, list[str]] = {}
    for key, t in named.items():
        by_dtype.setdefault(t.dtype, []).append(key)
    for keys in by_dtype.values():
        flat = torch.cat([named[k].reshape(-1) for k in keys])
        if not bool(torch.isfinite(flat).all()):
            return next(k for k in keys if not bool(torch.isfinite(named[k]).all()))
    return None


def adapter_from_tensors(
    config: MokaConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str = "MoKA adapter",
    index: dict | None = None,
    all_values: torch.Tensor | None = None,
) -> MokaAdapter:
    """Build a validated adapter from named tensors (with or without the PEFT prefix).

    ``load_adapter`` and ``MokaAdapter.validate`` both come through here, so in-memory and
    on-disk adapters obey the same rules. ``index`` is ``_index_tensors``' result for these
    tensors' shapes when the caller has it already: ``load_adapter``, whose tensors are views of
    a file whose header it checked (names, shapes and dtypes), so they are not checked again.
    """
    try:
        config.validate()
        if index is None:
            for key, t in tensors.items():
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
                if t.dtype not in ALLOWED_DTYPES:
                    raise ValueError(
                        f"tensor {key!r} has dtype {t.dtype}; allowed dtypes are "
                        f"{[str(d) for d in ALLOWED_DTYPES]}"
                    )
            index = _index_tensors(config, {k: tuple(t.shape) for k, t in tensors.items()})
        # One pass over the file's values when the caller has them in one view (load_adapter);
        # the tensor is named only when something is wrong.
        whole_ok = all_values is not None and bool(torch.isfinite(all_values).all())
        bad = None if whole_ok else first_non_finite(tensors)
        if bad is not None:
            raise ValueError(f"tensor {bad!r} has non-finite values (NaN or Inf)")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    modules = {}
    for module, slots in index.items():
        r = len(config.targets[config.target_for(module)].components)
        modules[module] = MokaModuleWeights(
            A=[None if config.identity_a else tensors[slots[f"A.{i}"]] for i in range(r)],
            B=[tensors[slots[f"B.{i}"]] for i in range(r)],
            gate=tensors[slots["gate"]] if "gate" in slots else None,
        )
    return MokaAdapter(config, modules)


# --------------------------------------------------------------------------- files


def _where(path: str | os.PathLike) -> str:
    return f"MoKA adapter {os.fspath(path)!r}"


# adapter_config.json files are a few kB; a bigger one is not an adapter config.
MAX_CONFIG_BYTES = 1 << 20
# Real configs nest 3-4 levels; deeper JSON is refused before parsing (the parser would recurse).
MAX_CONFIG_DEPTH = 32


def _json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than ``limit`` (a scan, no parse)."""
    depth, in_string, escaped = 0, False, False
    for c in text:
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif c in "[{":
            depth += 1
            if depth > limit:
                return True
        elif c in "]}":
            depth -= 1
    return False


def read_config_json(file: str | os.PathLike) -> dict:
    """An adapter folder's ``adapter_config.json`` as a dict, or ``ValueError`` with the reason.

    The one reader every route uses (loader, resolver, ``moka-serve``'s precheck, inventory,
    reference): a missing or unreadable file, one over :data:`MAX_CONFIG_BYTES`, invalid JSON,
    JSON nested deeper than :data:`MAX_CONFIG_DEPTH` (scanned before parsing, which would
    recurse) and a non-object all become ``ValueError``, never another exception.
    """
    file = Path(file)
    try:
        size = file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"{file.name} is {size} bytes, over the {MAX_CONFIG_BYTES} limit")
        text = file.read_text(encoding="utf-8")
        if _json_depth_exceeds(text, MAX_CONFIG_DEPTH):
            raise ValueError(
                f"{file.name} is nested too deeply (over {MAX_CONFIG_DEPTH} levels) to be an "
                "adapter config"
            )
        d = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file.name} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{file.name} must be a JSON object, got {type(d).__name__}")
    return d


def config_kind(cfg: Mapping[str, object]) -> str:
    """The kind of adapter a config declares: its ``peft_type`` ("MOKA", "LORA", ...).

    The one rule every route follows (the engine's loader, ``moka-serve``'s start-up check, the
    inventory, the slot planner, the trainer's reference). A config without ``peft_type`` is a
    LoRA: older PEFT LoRA configs lack it, and vLLM's own loader serves them as LoRA. A value that
    is not a string is returned as its ``repr``, so messages show what the file holds.
    """
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        return "LORA"
    return peft_type if isinstance(peft_type, str) else repr(peft_type)


def adapter_kind(path: str | os.PathLike) -> str:
    """:func:`config_kind` of ``<path>/adapter_config.json``; ``ValueError`` with the reason if
    the config is missing or unreadable."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{_where(path)}: missing {CONFIG_NAME}")
    return config_kind(read_config_json(cfg_path))


def is_moka_adapter_dir(path: str | os.PathLike) -> bool:
    """True if ``path`` holds an adapter_config.json of a MoKA adapter. Never raises."""
    try:
        return adapter_kind(path) == PEFT_TYPE
    except ValueError:
        return False


def read_adapter_config(path: str | os.PathLike) -> MokaConfig:
    """Read and validate ``<path>/adapter_config.json``."""
    cfg_path = Path(path) / CONFIG_NAME
    if not cfg_path.is_file():
        raise ValueError(f"{_where(path)}: missing {CONFIG_NAME}")
    try:
        d = read_config_json(cfg_path)
    except ValueError as e:
        raise ValueError(f"{_where(path)}: {e}") from None
    try:
        return MokaConfig.from_dict(d)
    except ValueError as e:
        raise ValueError(f"{_where(path)}: {CONFIG_NAME}: {e}") from None


def read_tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of an adapter folder's weights, from the checked header only."""
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"{_where(path)}: missing {WEIGHTS_NAME}")
    try:
        return _read_header(file)
    except ValueError as e:
        raise ValueError(f"{_where(path)}: {e}") from None


def _read_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Parse and check a safetensors header without reading the data: name -> shape.

    Checks the file size limit, that the dtypes are allowed, that each tensor's byte range
    matches its shape and dtype, and that the ranges tile the data exactly up to the end of the
    file (so truncated or padded files are caught here).
    """
    size = file.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise ValueError(f"{WEIGHTS_NAME} is {size} bytes, over the {MAX_ADAPTER_BYTES} limit")
    with open(file, "rb") as f:
        entries, _ = _parse_header(f.read, size)
    return {name: shape for name, (_, shape, _) in entries.items()}


def _read_tensors(file: Path) -> tuple[_Layout, dict[str, torch.Tensor], torch.Tensor | None]:
    """Read the whole file once, check its header, and return (layout, tensors, values):
    the header's :class:`_Layout` (shared, read-only), and ``values``, every value in one view
    when the file has one dtype (else None), so the finiteness check is one pass, not one per
    tensor.

    The tensors are views of the one buffer read (``safetensors.load_file`` builds each of a
    MoKA file's thousands of small tensors separately, the larger part of a cold load), and the
    header is parsed from that same buffer, so a file re-saved while it is read cannot give
    data that disagrees with the header checked.
    """
    size = file.stat().st_size
    if size > MAX_ADAPTER_BYTES:
        raise ValueError(f"{WEIGHTS_NAME} is {size} bytes, over the {MAX_ADAPTER_BYTES} limit")
    data = bytearray(size)
    with open(file, "rb") as f:
        got = f.readinto(data)
    if got != size:
        raise ValueError(f"{WEIGHTS_NAME} changed size while it was read")
    view = memoryview(data)
    pos = 0

    def read(n: int) -> bytes:
        nonlocal pos
        chunk = view[pos : pos + n].tobytes()
        pos += len(chunk)
        return chunk

    layout = _read_layout(read, size)
    entries, header_len = layout.entries, layout.header_len
    if sys.byteorder != "little":  # safetensors stores little-endian: let it convert
        from safetensors.torch import load

        return layout, load(bytes(data)), None
    # Every value in one view when the file has one dtype (the tensors tile the data region):
    # the tensors are then strided views of it (a MoKA file holds hundreds of small tensors; one
    # ``frombuffer`` and ``view`` each cost twice as much, a tenth of a cold load).
    tags = {tag for tag, _, _ in entries.values()}
    values = None
    if len(tags) == 1:
        dtype, itemsize = _ST_DTYPES[next(iter(tags))]
        start, nbytes = 8 + header_len, len(data) - 8 - header_len
        if nbytes and start % itemsize == 0:
            values = torch.frombuffer(data, dtype=dtype, count=nbytes // itemsize, offset=start)
    if values is not None:
        base = values.storage_offset()
        tensors = {name: values.as_strided(shape, stride, base + offset)
                   for name, shape, stride, offset in layout.strided(itemsize)}  # fmt: skip
        return layout, tensors, values
    tensors = {}
    for name, (tag, shape, begin) in entries.items():
        dtype, itemsize = _ST_DTYPES[tag]
        numel = math.prod(shape)
        offset = 8 + header_len + begin
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        elif offset % itemsize:  # misaligned for a view (not written by safetensors): copy
            raw = bytearray(view[offset : offset + numel * itemsize])
            t = torch.frombuffer(raw, dtype=dtype).view(shape)
        else:
            t = torch.frombuffer(data, dtype=dtype, count=numel, offset=offset).view(shape)
        tensors[name] = t
    return layout, tensors, values


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


class _Layout:
    """A checked safetensors header: ``entries`` (name -> (dtype tag, shape, data begin)),
    ``shapes`` (name -> shape), the header's length and the data bytes it describes, and the
    tensor index of each config it was checked against (``_index_tensors``). Shared by every
    file with the same header bytes, so read-only."""

    __slots__ = ("entries", "shapes", "header_len", "data_bytes", "indexes", "_strided")

    def __init__(self, entries: dict, header_len: int, data_bytes: int) -> None:
        self.entries = entries
        self.shapes = {name: shape for name, (_, shape, _) in entries.items()}
        self.header_len = header_len
        self.data_bytes = data_bytes
        self.indexes: dict[tuple, dict] = {}
        self._strided: list[tuple[str, tuple[int, ...], tuple[int, ...], int]] | None = None

    def strided(self, itemsize: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], int]]:
        """(name, shape, strides, offset in items) of each tensor as a view of the data region,
        for a file of one dtype of ``itemsize`` bytes (one dtype: the same for every file)."""
        if self._strided is None:
            strides: dict[tuple[int, ...], tuple[int, ...]] = {}
            self._strided = [
                (name, shape, strides.setdefault(shape, _contiguous_strides(shape)),
                 begin // itemsize)
                for name, (_, shape, begin) in self.entries.items()
            ]  # fmt: skip
        return self._strided


# Checked headers by their exact bytes: the adapters a server loads mostly share a few layouts
# (every adapter moka-train writes for one base and one config has the same header), and parsing
# and checking a header of hundreds of tensors, then indexing it against the config, was a third
# of a MoKA cold load. Equal bytes give an equal parse, so a hit skips nothing a miss checks but
# the file's size, which is checked on every read. At most this many layouts are kept.
_MAX_LAYOUTS = 16
_LAYOUTS: dict[bytes, _Layout] = {}


def _parse_header(read, size: int) -> tuple[dict[str, tuple[str, tuple[int, ...], int]], int]:
    """``(name -> (dtype tag, shape, data begin), header length)`` of a safetensors file of
    ``size`` bytes whose bytes ``read(n)`` returns in order (see :func:`_read_header`)."""
    layout = _read_layout(read, size)
    return layout.entries, layout.header_len


def _read_layout(read, size: int) -> _Layout:
    """The checked :class:`_Layout` of a safetensors file of ``size`` bytes whose bytes
    ``read(n)`` returns in order; from :data:`_LAYOUTS` when its header bytes were seen."""
    head = read(8)
    if len(head) < 8:
        raise ValueError(f"{WEIGHTS_NAME} is {size} bytes: truncated or not safetensors")
    n = int.from_bytes(head, "little")
    if n > min(size - 8, _MAX_HEADER_BYTES):
        raise ValueError(
            f"{WEIGHTS_NAME} header length {n} does not fit the {size}-byte file: "
            "truncated or not safetensors"
        )
    raw = read(n)
    layout = _LAYOUTS.get(raw)
    if layout is None:
        layout = _check_header(raw)
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            del _LAYOUTS[next(iter(_LAYOUTS))]  # the oldest
        _LAYOUTS[raw] = layout
    if 8 + n + layout.data_bytes != size:
        raise ValueError(
            f"{WEIGHTS_NAME} is {size} bytes but its header describes "
            f"{8 + n + layout.data_bytes}: truncated or corrupt file"
        )
    return layout


def _check_header(raw: bytes) -> _Layout:
    """Parse and check a safetensors header's JSON (see :func:`_read_header`)."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{WEIGHTS_NAME} header is not valid JSON (corrupt file): {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{WEIGHTS_NAME} header is not a JSON object (corrupt file)")
    header.pop("__metadata__", None)
    shapes, spans = {}, []
    for name, info in header.items():
        # Thousands of entries in a mixed adapter's file: plain type tests (``type(d) is int``
        # is _is_int: no bool), no generator per entry.
        ok = type(info) is dict
        if ok:
            tag, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            ok = type(tag) is str and type(shape) is list and type(offsets) is list
            ok = ok and len(offsets) == 2 and type(offsets[0]) is int and type(offsets[1]) is int
            for d in shape if ok else ():
                if type(d) is not int or d < 0:
                    ok = False
                    break
        if not ok:
            raise ValueError(f"{WEIGHTS_NAME} header entry {name!r} is malformed: {info!r}")
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(
                f"tensor {name!r} has dtype {info['dtype']}; allowed dtypes are "
                f"{list(_ST_DTYPES)} (float32, float16, bfloat16)"
            )
        begin, end = info["data_offsets"]
        nbytes = math.prod(info["shape"]) * _ST_DTYPES[info["dtype"]][1]
        if not 0 <= begin <= end or end - begin != nbytes:
            raise ValueError(
                f"tensor {name!r}: data_offsets {info['data_offsets']} do not match its "
                f"shape and dtype ({nbytes} bytes): corrupt file"
            )
        shapes[name] = (info["dtype"], tuple(info["shape"]), begin)
        spans.append((begin, end))
    pos = 0
    for begin, end in sorted(spans):
        if begin != pos:
            raise ValueError(f"{WEIGHTS_NAME} tensor data overlaps or has holes: corrupt file")
        pos = end
    return _Layout(shapes, len(raw), pos)


def load_adapter(
    path: str | os.PathLike,
    *,
    base_dims: Mapping[str, tuple[int, int]] | None = None,
    dtype: torch.dtype | None = None,
) -> MokaAdapter:
    """Read and fully validate an adapter folder.

    ``base_dims`` maps a target name to the base layer's ``(out_features, in_features)``; when
    given the config's dims must agree with it. ``dtype`` (one of ALLOWED_DTYPES) casts all
    tensors after validation.
    """
    where = _where(path)
    if dtype is not None and dtype not in ALLOWED_DTYPES:
        raise ValueError(f"{where}: cannot load as {dtype}; allowed dtypes are {ALLOWED_DTYPES}")
    config = read_adapter_config(path)
    if base_dims is not None:
        try:
            config.check_base_dims(base_dims)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    file = Path(path) / WEIGHTS_NAME
    if not file.is_file():
        raise ValueError(f"{where}: missing {WEIGHTS_NAME}")
    try:
        layout, tensors, values = _read_tensors(file)
        index = _layout_index(config, layout)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    except Exception as e:  # safetensors/OS errors: report as a corrupt file
        raise ValueError(f"{where}: cannot read {WEIGHTS_NAME} (corrupt file?): {e}") from None
    adapter = adapter_from_tensors(config, tensors, where=where, index=index, all_values=values)
    if dtype is not None:
        for w in adapter.modules.values():
            w.A = [None if a is None else a.to(dtype) for a in w.A]
            w.B = [b.to(dtype) for b in w.B]
            w.gate = None if w.gate is None else w.gate.to(dtype)
            for t in (*w.A, *w.B, w.gate):
                if t is not None and not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{where}: values overflow when cast to {dtype}")
    return adapter


def _atomic_write(target: Path, write) -> None:
    """Write via a temp file + rename so a server never sees a half-written file."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(str(tmp))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_adapter(adapter: MokaAdapter, path: str | os.PathLike) -> None:
    """Validate ``adapter`` and write it as a v1 folder (created if needed)."""
    try:
        adapter.validate()
    except ValueError as e:
        raise ValueError(f"refusing to save {_where(path)}: {e}") from None
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    # safetensors wants contiguous CPU tensors that share no storage.
    tensors = {
        k: t.detach().to("cpu").clone(memory_format=torch.contiguous_format)
        for k, t in tensors_from_adapter(adapter).items()
    }
    _atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(adapter.config.to_dict(), indent=2) + "\n"
    _atomic_write(folder / CONFIG_NAME, lambda p: Path(p).write_text(text, encoding="utf-8"))
