"""Shared test setup.

Triton has no CPU backend: without a GPU its kernels run in the interpreter, which must be
chosen before ``triton`` decorates any kernel, so it is set here, before test modules import.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
