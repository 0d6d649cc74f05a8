"""One bitsandbytes 0.50 quirk on CPUs with AVX512-BF16 (seen on Intel Xeons here, 2026-12).

``bnb.nn.Linear4bit.forward`` repacks its weight *in place* into a CPU-only layout the first
time it runs in eval mode without gradients (``support_avx512bf16_for_cpu``). After that the
layer's ``weight.data``/``quant_state`` no longer dequantize with ``dequantize_4bit`` (the merged
reference reads them), and every later call goes through ``gemv_4bit``, which has no autograd:
switching back to training then silently stops gradients through the base (QLoRA training
stops learning). On CPUs without AVX512-BF16 (the AMD EPYCs here) nothing of this happens.
Models of this project keep the portable layout everywhere.
"""

from __future__ import annotations

from torch import nn


def keep_portable_4bit_layout(model: nn.Module) -> nn.Module:
    """Turn bitsandbytes' in-place CPU repacking off for every ``Linear4bit`` of ``model``."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model
