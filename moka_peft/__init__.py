"""MoKA as a PEFT method (peft 0.21.x): ``get_peft_model(model, MokaPeftConfig(...))``,
``PeftModel.from_pretrained`` on any format-v1 folder, ``merge_and_unload``.

Importing this package registers the method. PEFT has no plug-in discovery and its
``PeftType`` is a closed enum, so the member ``MOKA`` is added here (the one patch of PEFT,
checked against the pinned version) before ``register_peft_method``; every process that reads
a MoKA folder through PEFT must import ``moka_peft`` first.
"""

from __future__ import annotations

import peft
from peft.utils import PeftType, register_peft_method

PEFT_VERSION_PREFIX = "0.21."


def _add_peft_type() -> None:
    """Add ``PeftType.MOKA`` (a real member: transformers reads ``peft_type.value``)."""
    if "MOKA" in PeftType.__members__:
        return
    if not peft.__version__.startswith(PEFT_VERSION_PREFIX):
        raise RuntimeError(
            f"moka_peft is pinned to peft {PEFT_VERSION_PREFIX}x; peft {peft.__version__} is "
            "installed (its PeftType may no longer be extended this way)"
        )
    member = str.__new__(PeftType, "MOKA")
    member._name_ = "MOKA"
    member._value_ = "MOKA"
    type.__setattr__(PeftType, "MOKA", member)
    PeftType._member_map_["MOKA"] = member
    PeftType._value2member_map_["MOKA"] = member
    PeftType._member_names_.append("MOKA")


_add_peft_type()

from .config import MokaPeftConfig  # noqa: E402
from .layer import MokaLayer, MokaLinear  # noqa: E402
from .model import MokaModel  # noqa: E402

if PeftType.MOKA not in peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(
        name="moka", config_cls=MokaPeftConfig, model_cls=MokaModel, prefix="moka_"
    )

__all__ = ["MokaLayer", "MokaLinear", "MokaModel", "MokaPeftConfig"]
