"""moka-core: what the trainer, the PEFT tuner, the vLLM plugin, the serve CLI and the benchmarks
share, with torch and safetensors only (no vLLM; transformers and bitsandbytes only inside the
functions that need them).

* ``adapter_format``: format v1 (reader, writer, ``adapter_kind``, the reference ``kron_sum``).
* ``adapter_check``, ``adapter_dir``, ``limits``, ``slots``: what may be served, and where from.
* ``admin_access``: who may change the adapter set.
* ``shapes``: Kronecker shapes, budgets, families.
* ``base_models``: the embedded SmolLM2 and the tiny test Llama, and their dims.
* ``bnb_cpu``: the one bitsandbytes CPU workaround.
* ``settings``: every ``MOKA_*`` variable, one table.
* ``reference``: ground truth for serving tests (adapters merged in float64, greedy decoding with
  logprobs).

Import rule (``tests/test_layering.py``): kernels <- core <- {tuner <- trainer, vLLM plugin, serve
CLI} <- bench.
"""
