"""Median wall time of reading and validating one adapter folder (the format side of a cold load).

    python benchmarks/load_adapter_time.py [FOLDER]   # default: examples/adapters/date-moka

Prints the header check, ``safetensors.load_file`` alone (the file read and tensor creation),
the whole ``load_adapter`` and ``fold``, medians of 15 runs each in one process.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from moka_core.adapter_format import WEIGHTS_NAME, load_adapter, read_tensor_shapes


def median_ms(fn, n: int = 15) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "examples/adapters/date-moka")
    adapter = load_adapter(folder)
    print(f"{folder}")
    print(f"header check    {median_ms(lambda: read_tensor_shapes(folder)):6.1f} ms")
    print(f"load_file       {median_ms(lambda: load_file(folder / WEIGHTS_NAME)):6.1f} ms")
    print(f"load_adapter    {median_ms(lambda: load_adapter(folder)):6.1f} ms")
    print(f"fold (float64)  {median_ms(lambda: adapter.fold(dtype=torch.float64)):6.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
