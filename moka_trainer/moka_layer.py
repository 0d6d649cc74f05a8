"""MoKA modules: a Kronecker-mixture update around a frozen (possibly 4-bit) linear layer.

``MokaLinear(base)`` computes ``base(x) + scaling * sum_i alpha_i * kron(A_i, B_i) @ x`` with
``alpha = softmax(gate)`` (or ones without gating) by reshape-and-matmul, never forming the
Kronecker product: for ``X = x.reshape(T, n1, n2)``, ``kron(A, B) @ x == A @ X @ B.T``.

Helpers inject such modules into a transformers model by target name, export the trained
factors as a :class:`moka_serve.adapter_format.MokaAdapter`, and attach a loaded adapter to a
model unmerged (the per-layer-add reference used as ground truth for serving).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from moka_kernels.torch_ops import mixture_matmul, mixture_plan
from moka_serve.adapter_format import (
    ComponentShape,
    MokaAdapter,
    MokaConfig,
    MokaModuleWeights,
    TargetSpec,
)

FACTOR_DTYPE = torch.float32
INITS = ("lora", "a-random")


class MokaLinear(nn.Module):
    """A frozen linear layer plus a mixture of Kronecker adapters.

    ``base`` is an ``nn.Linear`` or a bitsandbytes ``Linear4bit`` (anything with
    ``in_features``/``out_features`` that maps ``(..., in)`` to ``(..., out)``). The factors are
    kept in float32 whatever the base's dtype.

    ``init`` says which factor starts at zero, so that the update is exactly zero at step 0
    while the other factor's gradient is not:

    * ``"lora"`` (default): ``B_i`` (the input side: it sees ``x``'s last ``n2`` features)
      Kaiming-uniform over its fan-in ``n2``, ``A_i`` zero. For a rank-1 component
      ``(out, 1, 1, in)`` this is exactly LoRA's initialisation (random input-side row, zero
      output-side column), so such components train like LoRA for the same coefficient.
    * ``"a-random"``: ``A_i`` Kaiming-uniform, ``B_i`` zero (the first release's choice; for a
      rank-1 component it puts a U(-1, 1) column on the output side).

    MoKAs (identity ``A_i``) has only ``B_i``, which starts at zero.

    Components whose A is a column (``n1 == 1``: every rank-1 component) are computed together
    as one LoRA-like pair of matmuls, so r rank-1 components cost what a rank-r LoRA costs.
    """

    def __init__(
        self,
        base: nn.Module,
        components: Sequence[ComponentShape],
        *,
        gating: bool = True,
        variant: str = "moka",
        scaling: float = 1.0,
        init: str = "lora",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.init = init
        if variant not in ("moka", "mokas"):
            raise ValueError(f"variant must be 'moka' or 'mokas', got {variant!r}")
        if not components:
            raise ValueError("a MoKA module needs at least one component")
        self.base = base
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)
        for i, c in enumerate(components):
            if c.m1 * c.m2 != self.out_features or c.n1 * c.n2 != self.in_features:
                raise ValueError(
                    f"component {i} {c.as_list()} does not factor the {self.out_features}x"
                    f"{self.in_features} layer (m1*m2 must be out, n1*n2 must be in)"
                )
            if variant == "mokas" and c.m1 != c.n1:
                raise ValueError(f"component {i} {c.as_list()}: mokas needs m1 == n1")
        self.components = tuple(components)
        self.gating = gating
        self.variant = variant
        self.scaling = float(scaling)
        self.disabled = False
        device = _param_device(base)
        identity = variant == "mokas"
        self.moka_A = nn.ParameterList(
            []
            if identity
            else [
                nn.Parameter(torch.empty(c.m1, c.n1, dtype=FACTOR_DTYPE, device=device))
                for c in components
            ]
        )
        self.moka_B = nn.ParameterList(
            [
                nn.Parameter(torch.zeros(c.m2, c.n2, dtype=FACTOR_DTYPE, device=device))
                for c in components
            ]
        )
        if gating:
            self.moka_gate = nn.Parameter(
                torch.zeros(len(components), dtype=FACTOR_DTYPE, device=device)
            )
        else:
            self.register_parameter("moka_gate", None)
        self._plan = mixture_plan(self.components, identity)
        self.reset_parameters()

    @property
    def identity_a(self) -> bool:
        return self.variant == "mokas"

    def reset_parameters(self) -> None:
        """One factor Kaiming-uniform (as nn.Linear), the other zero (see ``init``), gate logits
        zero: delta_W = 0."""
        with torch.no_grad():
            random_b = self.init == "lora" and not self.identity_a
            for a in self.moka_A:
                if random_b:
                    a.zero_()
                else:
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            for b in self.moka_B:
                if random_b:
                    nn.init.kaiming_uniform_(b, a=math.sqrt(5))
                else:
                    b.zero_()
            if self.moka_gate is not None:
                self.moka_gate.zero_()

    def coefficients(self) -> torch.Tensor:
        """``scaling * alpha`` (length r), alpha = softmax(gate) or ones."""
        if self.moka_gate is not None:
            return self.scaling * torch.softmax(self.moka_gate, dim=0)
        return torch.full((len(self.components),), self.scaling, dtype=FACTOR_DTYPE)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``delta_W @ x`` for ``x`` of shape ``(..., in)``, in float32, by two matmuls each
        (rank-1 components together: ``moka_kernels.torch_ops.mixture_matmul``)."""
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(FACTOR_DTYPE)
        a = None if self.identity_a else list(self.moka_A)
        coeff = self.coefficients().to(xf.device)
        out = mixture_matmul(xf, self.components, a, list(self.moka_B), coeff, self._plan)
        return out.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if self.disabled:
            return y
        return y + self.delta(x).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """Dense ``(out, in)`` update in float64 (tests and debugging only: uses torch.kron)."""
        coeff = self.coefficients().detach().to(torch.float64)
        dw = torch.zeros(self.out_features, self.in_features, dtype=torch.float64)
        for i, c in enumerate(self.components):
            a = (
                torch.eye(c.m1, dtype=torch.float64)
                if self.identity_a
                else self.moka_A[i].detach().cpu().double()
            )
            dw += coeff[i].cpu() * torch.kron(a, self.moka_B[i].detach().cpu().double())
        return dw

    def weights(self) -> MokaModuleWeights:
        """A detached float32 copy of the trained tensors, in the format's layout."""
        r = len(self.components)

        def cp(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", FACTOR_DTYPE).clone()

        return MokaModuleWeights(
            A=[None] * r if self.identity_a else [cp(a) for a in self.moka_A],
            B=[cp(b) for b in self.moka_B],
            gate=None if self.moka_gate is None else cp(self.moka_gate),
        )

    def load_weights(self, w: MokaModuleWeights) -> None:
        """Copy an adapter module's tensors in (shapes must match this module's components)."""
        with torch.no_grad():
            if not self.identity_a:
                for p, t in zip(self.moka_A, w.A, strict=True):
                    p.copy_(t.to(FACTOR_DTYPE))
            for p, t in zip(self.moka_B, w.B, strict=True):
                p.copy_(t.to(FACTOR_DTYPE))
            if self.moka_gate is not None:
                if w.gate is None:
                    raise ValueError("gating is on but the adapter module has no gate")
                self.moka_gate.copy_(w.gate.to(FACTOR_DTYPE))

    def extra_repr(self) -> str:
        shapes = ",".join("x".join(map(str, c.as_list())) for c in self.components)
        return (
            f"variant={self.variant}, gating={self.gating}, scaling={self.scaling}, "
            f"init={self.init}, shapes={shapes}"
        )


def _param_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def is_linear(module: nn.Module) -> bool:
    """nn.Linear and subclasses (bitsandbytes Linear4bit/Linear8bitLt are subclasses)."""
    return isinstance(module, nn.Linear)


def find_target_modules(model: nn.Module, targets: Sequence[str]) -> dict[str, nn.Module]:
    """Module path -> linear module, for every linear whose last name part is a target."""
    wanted = set(targets)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, MokaLinear):
            continue
        if name.rsplit(".", 1)[-1] in wanted and is_linear(module):
            found[name] = module
    return found


def target_dims(model: nn.Module, targets: Sequence[str]) -> tuple[dict, dict]:
    """For each target: ``(out, in)`` of its layers and how many layers it matches.

    Raises ValueError when a target matches no linear layer, or layers of different sizes
    (the format keeps one set of shapes per target name).
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


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def inject_moka(
    model: nn.Module,
    shapes: Mapping[str, Sequence[ComponentShape]],
    *,
    gating: bool = True,
    variant: str = "moka",
    scaling: float = 1.0,
    init: str = "lora",
    freeze_base: bool = True,
) -> dict[str, MokaLinear]:
    """Wrap every linear named by a key of ``shapes`` in a :class:`MokaLinear`.

    With ``freeze_base`` every other parameter of the model stops requiring gradients, so
    only the MoKA factors and gates train. Returns module path -> MokaLinear.
    """
    if freeze_base:
        for p in model.parameters():
            p.requires_grad_(False)
    target_dims(model, list(shapes))  # clear error for a missing target or mixed sizes
    wrapped = {}
    for path, base in find_target_modules(model, list(shapes)).items():
        target = path.rsplit(".", 1)[-1]
        m = MokaLinear(
            base, shapes[target], gating=gating, variant=variant, scaling=scaling, init=init
        )
        _set_submodule(model, path, m)
        wrapped[path] = m
    return wrapped


def moka_modules(model: nn.Module) -> dict[str, MokaLinear]:
    """Module path (as it is in the plain model, without ``.base``) -> MokaLinear."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MokaLinear)}


def remove_moka(model: nn.Module) -> None:
    """Put the original base layers back (the inverse of inject_moka / attach_adapter)."""
    for path, m in moka_modules(model).items():
        _set_submodule(model, path, m.base)


def set_moka_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every MoKA update on or off (off: the model is exactly the base model)."""
    for m in moka_modules(model).values():
        m.disabled = not enabled


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def export_adapter(model: nn.Module, base_model_name_or_path: str = "") -> MokaAdapter:
    """The model's MoKA modules as a validated :class:`MokaAdapter` (float32 tensors).

    Module paths are those of the plain model (``model.layers.0.self_attn.q_proj``); if the
    model is wrapped (e.g. by PEFT) the leading wrapper path is not stripped.
    """
    mods = moka_modules(model)
    if not mods:
        raise ValueError("the model has no MoKA modules to export")
    first = next(iter(mods.values()))
    targets: dict[str, TargetSpec] = {}
    for path, m in mods.items():
        t = path.rsplit(".", 1)[-1]
        spec = TargetSpec(m.in_features, m.out_features, tuple(m.components))
        if t in targets and targets[t] != spec:
            raise ValueError(f"modules of target {t!r} have different shapes; cannot export")
        if (m.gating, m.variant, m.scaling) != (first.gating, first.variant, first.scaling):
            raise ValueError("MoKA modules differ in gating/variant/scaling; cannot export")
        targets[t] = spec
    config = MokaConfig(
        target_modules=list(targets),
        targets=targets,
        gating=first.gating,
        scaling=first.scaling,
        variant=first.variant,
        base_model_name_or_path=base_model_name_or_path,
    )
    adapter = MokaAdapter(config, {path: m.weights() for path, m in mods.items()})
    adapter.validate()
    return adapter


def attach_adapter(model: nn.Module, adapter: MokaAdapter) -> dict[str, MokaLinear]:
    """Attach a loaded adapter unmerged: each adapted layer computes ``base(x) + delta_W x``.

    This is the per-layer-add reference. The base stays frozen and untouched; every module of
    the adapter must exist in the model with the adapter's dims, or a ValueError says which.
    """
    cfg = adapter.config
    dims, _ = target_dims(model, cfg.target_modules)
    cfg.check_base_dims(dims)
    linears = find_target_modules(model, cfg.target_modules)
    missing = sorted(set(adapter.modules) - set(linears))
    if missing:
        raise ValueError(
            f"adapter modules {missing[:3]}{'...' if len(missing) > 3 else ''} are not linear "
            "layers of this model"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    attached = {}
    for path, w in adapter.modules.items():
        spec = cfg.targets[cfg.target_for(path)]
        m = MokaLinear(
            linears[path],
            spec.components,
            gating=cfg.gating,
            variant=cfg.variant,
            scaling=cfg.scaling,
        )
        m.load_weights(w)
        m.requires_grad_(False)
        _set_submodule(model, path, m)
        attached[path] = m
    return attached
