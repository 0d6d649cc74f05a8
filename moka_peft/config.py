"""``MokaConfig`` for PEFT: the fields of format v1's ``adapter_config.json`` as a ``PeftConfig``.

``save_pretrained`` writes exactly format v1 (``moka_core.adapter_format.MokaConfig.to_dict``),
so the server loads a PEFT-saved folder unchanged, and ``PeftConfig.from_pretrained`` reads any
format-v1 folder (``moka-train``'s included) because every key of it is a field here.

``targets`` gives each target module's components as ``[m1, n1, m2, n2]`` lists; the layer
dimensions are filled in from the model when the adapter is injected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils import PeftType

from moka_core.adapter_format import FORMAT_VERSION, ComponentShape, MokaConfig, TargetSpec


def default_scaling(components: int, gating: bool) -> float:
    """Each component starts at coefficient 2, the alpha / rank = 2 of a LoRA with alpha = 2 *
    rank: with softmax gates alpha_i = 1/r at init, so the scaling is 2r (2 ungated). Rank-1
    components then train exactly like that LoRA's terms; scaling 1 would make the update 2r
    times smaller, which under Adam means that much slower learning in function space."""
    return float(2 * components if gating else 2)


@dataclass
class MokaPeftConfig(PeftConfig):
    """A MoKA adapter: ``delta_W = scaling * sum_i softmax(g)_i kron(A_i, B_i)`` per target.

    Either name the components (``targets``, as format v1 does), or say what to plan and let the
    model fill them in (``moka_peft.planning.plan``, at ``get_peft_model``):
    ``MokaPeftConfig(target_modules="all-linear", budget="lora-8")`` is MoKA at a rank-8 LoRA's
    size, with ``moka-train``'s defaults (mixed family, LoRA init, softmax gates, scaling 2r).
    """

    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "module names (bare, e.g. q_proj), or 'all-linear'"}
    )
    targets: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "name -> {'components': [[m1, n1, m2, n2], ...]} (dims filled in)"},
    )
    gating: bool = field(default=True, metadata={"help": "softmax gates over the components"})
    scaling: float | None = field(
        default=None,
        metadata={"help": "the update's overall factor; None: 2 per component (as LoRA's 2r/r)"},
    )
    variant: str = field(default="moka", metadata={"help": "moka, or mokas (identity A)"})
    init: str = field(default="lora", metadata={"help": "lora (A zero) or a-random (B zero)"})
    # What to plan when ``targets`` is empty (moka_core.shapes.plan_shapes).
    budget: str | None = field(
        default=None,
        metadata={"help": "trainable parameters: '0.1%' of the base, '200k', or 'lora-8'"},
    )
    components: int = field(default=4, metadata={"help": "components (kron; or no budget)"})
    shape_family: str | None = field(
        default=None, metadata={"help": "mixed | lora | kron; None: mixed (kron for mokas)"}
    )
    shapes: list[str] = field(
        default_factory=list, metadata={"help": "explicit shapes, 'q_proj=64x9x9x64,...'"}
    )
    moka_format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MOKA
        if self.variant not in ("moka", "mokas"):
            raise ValueError(f"variant must be moka or mokas, got {self.variant!r}")
        if self.init not in ("lora", "a-random"):
            raise ValueError(f"init must be lora or a-random, got {self.init!r}")
        if not self.targets:
            if not self.target_modules:
                raise ValueError("MoKA needs target_modules (names, or 'all-linear') or targets")
            if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
                self.target_modules = [self.target_modules]
            return
        if self.target_modules is None:
            self.target_modules = list(self.targets)
        if isinstance(self.target_modules, str) or set(self.target_modules) != set(self.targets):
            raise ValueError(
                "MoKA names its targets one by one: target_modules must list exactly the keys of "
                f"targets (got {self.target_modules!r} and {sorted(self.targets)})"
            )
        if self.scaling is None:
            r = max(len(spec["components"]) for spec in self.targets.values())
            self.scaling = default_scaling(r, self.gating)

    def family(self) -> str:
        """The family of planned shapes: as given, else mixed (kron for MoKAs, which has no A)."""
        return self.shape_family or ("kron" if self.variant == "mokas" else "mixed")

    def component_shapes(self, target: str) -> list[ComponentShape]:
        return [ComponentShape(*map(int, c)) for c in self.targets[target]["components"]]

    def set_dims(self, target: str, out_features: int, in_features: int) -> None:
        spec = self.targets[target]
        if (
            spec.get("out_features", out_features) != out_features
            or spec.get("in_features", in_features) != in_features
        ):
            raise ValueError(
                f"target {target!r}: the config's dims ({spec.get('out_features')}x"
                f"{spec.get('in_features')}) differ from the model's ({out_features}x{in_features})"
            )
        spec["out_features"], spec["in_features"] = out_features, in_features

    def format_v1(self) -> MokaConfig:
        """The validated format-v1 config (dims must have been filled in)."""
        cfg = MokaConfig(
            target_modules=list(self.target_modules),
            targets={
                name: TargetSpec(
                    int(spec["in_features"]),
                    int(spec["out_features"]),
                    tuple(self.component_shapes(name)),
                )
                for name, spec in self.targets.items()
            },
            gating=self.gating,
            scaling=float(self.scaling),
            variant=self.variant,
            base_model_name_or_path=self.base_model_name_or_path or "",
        )
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """Format v1 once the dims are known (what ``save_pretrained`` writes); PEFT's generic
        dict before (it copies configs through ``to_dict`` too)."""
        if all("in_features" in s for s in self.targets.values()) and self.targets:
            return self.format_v1().to_dict()
        return super().to_dict()
