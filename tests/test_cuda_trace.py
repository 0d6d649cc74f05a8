"""The CUDA branch of the adapter op, traced on CPU over tensors without data.

No GPU runs in CI, and the GPU path (``MokaKernelMeta``'s Triton plan, then the kernel launch in
``apply_moka_cuda``) runs inside CUDA-graph capture, where reading device data on the host
(``.item()``, ``.tolist()``, a branch on a tensor) breaks the capture or silently freezes one
step's plan into the graph. Dynamo with ``fullgraph=True`` refuses exactly those: tracing the
path over ``FakeTensorMode`` tensors (no data) fails here if one is ever added.

The tensors live on device ``meta``, with the CUDA choices made explicit (``triton=True``,
``pooled=True``): torch 2.13's CPU build makes fake ``cuda`` tensors, but its Python indexing
(``t[:n]``, which the plan uses) then fails with "not linked with support for cuda devices".
Below the layer's ``x.is_cuda`` choice nothing in the path reads the device type. The kernel launch itself is the opaque custom op ``moka_kernels::moka_apply``
(its fake implementation runs); the kernel's numbers are checked by ``test_kernels.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

pytest.importorskip("vllm")

from moka_kernels import MokaBank  # noqa: E402
from moka_kernels.triton_ops import DECODE_BLOCK_T, PREFILL_BLOCK_T, choose_block_t  # noqa: E402
from moka_serve.plugin.kernel_metadata import MokaKernelMeta  # noqa: E402
from moka_serve.plugin.layers import apply_moka_cuda  # noqa: E402

SLOTS = 4
MAX_TOKENS = 512
IN, WIDTHS = 64, (64, 32)
DEVICE = "meta"  # two output slices, as a fused qkv-like layer


def _trace(fn, *args) -> None:
    """Compile ``fn`` with Dynamo, no graph break allowed, and run it once on fake tensors."""
    torch._dynamo.reset()
    torch.compile(fn, backend="eager", fullgraph=True)(*args)


@pytest.mark.parametrize("num_tokens", [1, 37, 200])
def test_cuda_plan_and_launch_trace_in_one_graph_with_no_host_sync(num_tokens):
    with FakeTensorMode():
        bank = MokaBank(
            num_slots=SLOTS,
            max_entries=3,
            max_a_numel=256,
            max_b_numel=256,
            in_features=IN,
            out_features=sum(WIDTHS),
            slice_widths=WIDTHS,
            device=DEVICE,
            pooled=True,
        )
        meta = MokaKernelMeta(MAX_TOKENS, SLOTS, device=DEVICE, triton=True)
        assert isinstance(meta.token_slots, FakeTensor)
        token_slots = torch.zeros(num_tokens, dtype=torch.long, device=DEVICE)
        x = torch.empty(num_tokens, IN, device=DEVICE)
        y = torch.empty(num_tokens, sum(WIDTHS), device=DEVICE)
        # The step's plan (outside the graph in vLLM, but it must not sync either), then one
        # layer's work, as the op runs it under capture.
        _trace(meta.update, token_slots)
        _trace(apply_moka_cuda, x, y, meta, bank)
        # A padded layer (more rows than the step's tokens), as the CUDA-graph runner pads.
        padded = num_tokens + 3
        _trace(apply_moka_cuda, torch.empty(padded, IN, device=DEVICE),
               torch.empty(padded, sum(WIDTHS), device=DEVICE), meta, bank)  # fmt: skip


def test_both_kernel_forms_are_traced():
    """The sizes above reach the decode form and the prefill form of the plan."""
    forms = {choose_block_t(n, SLOTS) for n in (1, 37, 200)}
    assert forms == {DECODE_BLOCK_T, PREFILL_BLOCK_T}
