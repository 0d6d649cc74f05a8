"""``MokaModel``: PEFT's ``BaseTuner`` for MoKA (what ``get_peft_model`` builds).

Targets are named one by one (``MokaPeftConfig.targets``); each named linear layer gets a
:class:`~moka_peft.layer.MokaLinear` with that target's components, and the config learns the
layer's dims, so ``save_pretrained`` writes a complete format-v1 ``adapter_config.json``.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

from .config import MokaPeftConfig
from .layer import MokaLayer, MokaLinear
from .planning import plan


class MokaModel(BaseTuner):
    prefix: str = "moka_"
    tuner_layer_cls = MokaLayer
    target_module_mapping: dict = {}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """Model key -> format-v1 key: ``moka_A.<adapter>.<i>.weight`` -> ``moka_A.<i>.weight``,
        ``moka_gate.<adapter>`` -> ``moka_gate``. PEFT applies it on save, and inverts it over
        the model's keys on load (the peft 0.21 hook, ``BaseTuner``)."""
        for part in ("moka_A", "moka_B"):
            key = key.replace(f".{part}.{adapter_name}.", f".{part}.")
        suffix = f".moka_gate.{adapter_name}"
        return key[: -len(adapter_name) - 1] if key.endswith(suffix) else key

    def _prepare_model(self, peft_config: MokaPeftConfig, model) -> None:
        """Plan the components on this model when the config does not name them yet."""
        self.moka_notes = plan(peft_config, model)

    def _create_and_replace(
        self,
        config: MokaPeftConfig,
        adapter_name: str,
        target,
        target_name: str,
        parent,
        current_key: str,
        **optional_kwargs,
    ) -> None:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not hasattr(base, "in_features") or not hasattr(base, "out_features"):
            raise TypeError(f"MoKA adapts linear layers; {current_key} is a {type(base).__name__}")
        config.set_dims(target_name, int(base.out_features), int(base.in_features))
        kwargs = {
            "gating": config.gating,
            "scaling": config.scaling,
            "variant": config.variant,
            "init": config.init,
        }
        shapes = config.component_shapes(target_name)
        if isinstance(target, MokaLayer):
            target.update_layer(adapter_name, shapes, **kwargs)
            return
        new_module = MokaLinear(target, adapter_name, shapes, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
