"""``MokaLayer``: a MoKA update around a frozen linear layer, as a PEFT tuner layer.

Parameters are laid out so that PEFT's state dict, once it drops the adapter name, has format
v1's keys exactly: ``<module>.moka_A.<i>.weight``, ``<module>.moka_B.<i>.weight`` and
``<module>.moka_gate`` (``moka_A[adapter][i].weight`` -> ``moka_A.<adapter>.<i>.weight``).

The forward never forms a Kronecker product, and computes rank-1 components together as one
LoRA-like pair of matmuls: the same ``moka_kernels.torch_ops.mixture_matmul`` as ``moka-train``.
Factors are float32 whatever the base's dtype (a 4-bit base included).
"""

from __future__ import annotations

import math

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from moka_core.adapter_format import ComponentShape, kron_sum
from moka_core.bnb_cpu import keep_portable_4bit_layout
from moka_kernels.torch_ops import MixturePlan, mixture_matmul, mixture_plan

FACTOR_DTYPE = torch.float32


class _Factor(nn.Module):
    """One factor, as ``.weight`` (the ``...moka_A.<i>.weight`` key of format v1)."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=FACTOR_DTYPE))


class MokaLayer(BaseTunerLayer):
    adapter_layer_names = ("moka_A", "moka_B", "moka_gate")
    other_param_names = ("moka_shapes", "moka_plans", "moka_scaling", "moka_gating")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        self.base_layer = base_layer
        # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks a 4-bit weight in place on its first
        # no-grad forward, after which it neither dequantizes (merge) nor trains.
        keep_portable_4bit_layout(base_layer)
        self.moka_A = nn.ModuleDict()
        self.moka_B = nn.ModuleDict()
        self.moka_gate = nn.ParameterDict()
        self.moka_shapes: dict[str, list[ComponentShape]] = {}
        self.moka_plans: dict[str, MixturePlan] = {}
        self.moka_scaling: dict[str, float] = {}
        self.moka_gating: dict[str, bool] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        base = self.get_base_layer()
        self.in_features = int(base.in_features)
        self.out_features = int(base.out_features)

    def update_layer(self, adapter_name: str, shapes, *, gating, scaling, variant, init) -> None:
        for c in shapes:
            if c.out_features != self.out_features or c.in_features != self.in_features:
                raise ValueError(
                    f"component {c.as_list()} does not fit a {self.out_features}x"
                    f"{self.in_features} layer"
                )
        identity = variant == "mokas"
        if not identity:
            self.moka_A[adapter_name] = nn.ModuleList(_Factor(c.m1, c.n1) for c in shapes)
        self.moka_B[adapter_name] = nn.ModuleList(_Factor(c.m2, c.n2) for c in shapes)
        if gating:  # format v1 stores a gate whenever gating is on (one component: weight 1)
            self.moka_gate[adapter_name] = nn.Parameter(torch.zeros(len(shapes)))
        self.moka_shapes[adapter_name] = list(shapes)
        self.moka_plans[adapter_name] = mixture_plan(shapes, identity)
        self.moka_scaling[adapter_name] = float(scaling)
        self.moka_gating[adapter_name] = bool(gating)
        self.reset_moka_parameters(adapter_name, init, identity)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device=None) -> None:
        """The base layer's device, but float32 factors whatever its dtype (PEFT would cast
        them to a bf16 base's dtype; ``get_peft_model`` upcasts again, a bare layer would not)."""
        super()._move_adapter_to_device_of_base_layer(adapter_name, device)
        for part in (self.moka_A, self.moka_B):
            if adapter_name in part:
                part[adapter_name].to(FACTOR_DTYPE)
        if adapter_name in self.moka_gate:
            self.moka_gate[adapter_name].data = self.moka_gate[adapter_name].data.to(FACTOR_DTYPE)

    @torch.no_grad()
    def reset_moka_parameters(self, adapter_name: str, init: str, identity: bool) -> None:
        """The update is zero at step 0 and one factor is random, as ``moka-train`` does:
        ``lora`` makes B (input side) Kaiming-uniform and A zero; ``a-random`` the reverse.
        MoKAs (identity A) has only B, which starts at zero."""
        if identity:
            return
        random_side = self.moka_B if init == "lora" else self.moka_A
        for f in random_side[adapter_name]:
            nn.init.kaiming_uniform_(f.weight, a=math.sqrt(5))

    def coefficients(self, adapter_name: str) -> torch.Tensor:
        n = len(self.moka_shapes[adapter_name])
        if adapter_name in self.moka_gate:
            alpha = torch.softmax(self.moka_gate[adapter_name].float(), dim=0)
        else:
            alpha = torch.ones(n, device=self.moka_B[adapter_name][0].weight.device)
        return self.moka_scaling[adapter_name] * alpha

    def delta(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``delta_W @ x`` for ``x`` of shape ``(..., in)``, in float32."""
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(FACTOR_DTYPE)
        # float32 whatever the factors are stored in: TRL's SFTTrainer casts adapter weights to
        # bf16 on a quantized base; the casts are of the small factors, not of x @ W.
        a = (
            [f.weight.to(FACTOR_DTYPE) for f in self.moka_A[adapter_name]]
            if adapter_name in self.moka_A
            else None
        )
        b = [f.weight.to(FACTOR_DTYPE) for f in self.moka_B[adapter_name]]
        out = mixture_matmul(xf, self.moka_shapes[adapter_name], a, b,
                             self.coefficients(adapter_name), self.moka_plans[adapter_name])  # fmt: skip
        return out.reshape(*lead, self.out_features)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The dense ``(out, in)`` update in float32 (merging and tests only), formed in float64
        by the format's reference formula."""
        a = (
            [f.weight.detach() for f in self.moka_A[adapter_name]]
            if adapter_name in self.moka_A
            else None
        )
        b = [f.weight.detach() for f in self.moka_B[adapter_name]]
        coeff = self.coefficients(adapter_name).detach()
        return kron_sum(self.moka_shapes[adapter_name], a, b, coeff).to(FACTOR_DTYPE)


class MokaLinear(nn.Module, MokaLayer):
    """``nn.Linear`` or a bitsandbytes ``Linear4bit`` with MoKA adapters."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, shapes, **kwargs) -> None:
        super().__init__()
        MokaLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, shapes, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name in self.moka_B:
                result = result + self.delta(name, x).to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        from peft.tuners.tuners_utils import check_adapters_to_merge

        for name in check_adapters_to_merge(self, adapter_names):
            if name in self.moka_B:
                self._add_to_base_weight(name, 1.0, safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self._add_to_base_weight(self.merged_adapters.pop(), -1.0, False)

    def _add_to_base_weight(self, name: str, sign: float, check_finite: bool) -> None:
        """``W += sign * delta_W``, through PEFT's quantization backend for a 4-bit base
        (dequantize, add, quantize again)."""
        from peft.utils.quantization_utils import resolve_quantization_backend

        base = self.get_base_layer()
        backend = resolve_quantization_backend(base)
        weight = backend.get_base_weight(base) if backend else base.weight.data
        new = (weight.float() + sign * self.get_delta_weight(name)).to(weight.dtype)
        if check_finite and not torch.isfinite(new).all():
            raise ValueError(f"NaNs detected in the merged weights of adapter {name!r}")
        if backend:
            backend.set_base_weight(self, new)
        else:
            base.weight.data = new

    def __repr__(self) -> str:
        return "moka." + super().__repr__()
