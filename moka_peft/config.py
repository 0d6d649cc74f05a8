"""``MokaConfig`` for PEFT: the fields of format v1's ``adapter_config.json`` as a ``PeftConfig``.

``save_pretrained`` writes exactly format v1 (``moka_serve.adapter_format.MokaConfig.to_dict``),
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

from moka_serve.adapter_format import FORMAT_VERSION, ComponentShape, MokaConfig, TargetSpec


@dataclass
class MokaPeftConfig(PeftConfig):
    """A MoKA adapter: ``delta_W = scaling * sum_i softmax(g)_i kron(A_i, B_i)`` per target."""

    target_modules: list[str] | None = field(default=None, metadata={"help": "module names"})
    targets: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "name -> {'components': [[m1, n1, m2, n2], ...]} (dims filled in)"},
    )
    gating: bool = field(default=True, metadata={"help": "softmax gates over the components"})
    scaling: float = field(default=1.0, metadata={"help": "the update's overall factor"})
    variant: str = field(default="moka", metadata={"help": "moka, or mokas (identity A)"})
    init: str = field(default="lora", metadata={"help": "lora (A zero) or a-random (B zero)"})
    moka_format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.MOKA
        if self.target_modules is None:
            self.target_modules = list(self.targets)
        if isinstance(self.target_modules, str) or set(self.target_modules) != set(self.targets):
            raise ValueError(
                "MoKA names its targets one by one: target_modules must list exactly the keys of "
                f"targets (got {self.target_modules!r} and {sorted(self.targets)})"
            )

    def components(self, target: str) -> list[ComponentShape]:
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
                    tuple(self.components(name)),
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
