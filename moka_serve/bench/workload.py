"""Reproducible request streams: which adapter each request uses, its lengths and arrival time.

Adapter popularity follows the peers so results compare (``../shared/notes`` has the sources):

* Punica's four, defined per batch of ``batch`` consecutive requests: ``distinct`` (every request
  its own adapter), ``uniform`` (about sqrt(batch) equal groups, each one adapter), ``skewed``
  (Zipf group sizes, alpha 1.5: a few large groups and a tail of singletons), ``identical``
  (the whole batch one adapter). New batches move on through the adapters, so over a run every
  adapter is used (each batch's adapters are fresh for ``distinct``).
* S-LoRA's ``powerlaw``: each request independently ``floor(numpy.random.power(alpha) * n)``
  (alpha 1 is uniform over adapters, smaller is more skewed).

Arrivals: ``closed`` loop (the driver keeps ``concurrency`` requests in flight) or an open loop
at ``request_rate`` requests/s with gamma inter-arrival times of shape ``1 / cv^2`` (cv 1 is
Poisson, as in S-LoRA and ``vllm bench serve``).

Lengths are ``N`` (fixed), ``uniform:LO:HI`` (S-LoRA: uniform in [LO, HI)) or
``lognormal:MEDIAN:SIGMA`` (Punica's prompts); prompts are random token ids, so the server's
tokenizer plays no part and every run sends the same tokens for a seed.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass

import numpy as np

POPULARITIES = ("distinct", "uniform", "skewed", "identical", "powerlaw")
SKEWED_ALPHA = 1.5


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload; ``arrival_s`` is None in a closed loop."""

    index: int
    model: str
    prompt: list[int]
    max_tokens: int
    arrival_s: float | None


@dataclass(frozen=True)
class WorkloadConfig:
    """Everything that determines a workload; the same config and seed give the same requests."""

    num_requests: int = 32
    popularity: str = "distinct"
    powerlaw_alpha: float = 1.0
    batch: int = 8
    input_len: str = "64"
    output_len: str = "32"
    request_rate: float | None = None  # None: closed loop
    burstiness_cv: float = 1.0
    token_range: tuple[int, int] = (10, 1000)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def parse_length(spec: str) -> tuple[str, tuple[float, ...]]:
    """``"64"``, ``"uniform:8:512"`` or ``"lognormal:64:0.5"`` -> (kind, params); ValueError."""
    parts = str(spec).split(":")
    try:
        if len(parts) == 1:
            n = int(parts[0])
            if n < 1:
                raise ValueError
            return "fixed", (n,)
        kind, *nums = parts
        vals = tuple(float(v) for v in nums)
    except ValueError:
        raise ValueError(
            f"bad length {spec!r}: use N, uniform:LO:HI or lognormal:MEDIAN:SIGMA"
        ) from None
    if kind == "uniform" and len(vals) == 2 and 1 <= vals[0] < vals[1]:
        return kind, vals
    if kind == "lognormal" and len(vals) == 2 and vals[0] >= 1 and vals[1] >= 0:
        return kind, vals
    raise ValueError(f"bad length {spec!r}: use N, uniform:LO:HI (1 <= LO < HI) or lognormal:M:S")


def draw_lengths(spec: str, n: int, rng: np.random.Generator) -> list[int]:
    kind, p = parse_length(spec)
    if kind == "fixed":
        return [int(p[0])] * n
    if kind == "uniform":
        return [int(v) for v in rng.integers(int(p[0]), int(p[1]), size=n)]
    vals = rng.lognormal(math.log(p[0]), p[1], size=n)
    return [max(1, round(v)) for v in vals]


def zipf_group_sizes(batch: int, alpha: float = SKEWED_ALPHA) -> list[int]:
    """Split ``batch`` into groups whose sizes fall off as ``k^-alpha`` (largest first).

    Group k (1-based) gets ``batch * k^-alpha / H`` requests, rounded, with ``H`` the sum over
    the groups; the number of groups grows until the next group would round to nothing, and
    whatever rounding leaves over goes to the first group. E.g. batch 8 -> [4, 2, 1, 1], 16 -> [8, 3, 2, 1, 1, 1].
    """
    best = [batch]
    for groups in range(2, batch + 1):
        weights = [k**-alpha for k in range(1, groups + 1)]
        total = sum(weights)
        sizes = [round(batch * w / total) for w in weights]
        if sizes[-1] < 1:
            break
        sizes[0] += batch - sum(sizes)
        if sizes[0] < 1:
            break
        best = sizes
    return best


def assign_adapters(
    popularity: str, num_requests: int, num_adapters: int, batch: int, alpha: float, rng
) -> list[int]:
    """The adapter index (0..num_adapters-1) of each request."""
    if popularity not in POPULARITIES:
        raise ValueError(f"unknown popularity {popularity!r}; choose from {POPULARITIES}")
    if popularity == "powerlaw":
        if alpha <= 0:
            raise ValueError("powerlaw alpha must be > 0")
        draws = rng.power(alpha, size=num_requests) * num_adapters
        return [min(int(v), num_adapters - 1) for v in draws]
    out: list[int] = []
    cursor = 0  # next adapter to hand out, so successive batches move through all of them
    while len(out) < num_requests:
        if popularity == "distinct":
            sizes = [1] * batch
        elif popularity == "uniform":
            groups = max(1, round(math.sqrt(batch)))
            sizes = [batch // groups + (1 if g < batch % groups else 0) for g in range(groups)]
        elif popularity == "skewed":
            sizes = zipf_group_sizes(batch)
        else:  # identical
            sizes = [batch]
        block: list[int] = []
        for size in sizes:
            block += [cursor % num_adapters] * size
            cursor += 1
        rng.shuffle(block)  # groups interleave in arrival order, as real traffic does
        out += block
    return out[:num_requests]


def arrival_times(cfg: WorkloadConfig, rng: np.random.Generator) -> list[float | None]:
    if cfg.request_rate is None:
        return [None] * cfg.num_requests
    if cfg.request_rate <= 0 or cfg.burstiness_cv <= 0:
        raise ValueError("request rate and burstiness cv must be > 0")
    shape = 1.0 / cfg.burstiness_cv**2
    gaps = rng.gamma(shape, 1.0 / (cfg.request_rate * shape), size=cfg.num_requests)
    gaps[0] = 0.0  # the first request starts the clock
    return [float(t) for t in np.cumsum(gaps)]


def build_workload(cfg: WorkloadConfig, models: list[str]) -> list[RequestSpec]:
    """The request stream for ``cfg`` over ``models`` (adapter names, or the base model name)."""
    if not models:
        raise ValueError("no models to send requests to")
    if cfg.num_requests < 1 or cfg.batch < 1:
        raise ValueError("num_requests and batch must be >= 1")
    lo, hi = cfg.token_range
    if not 0 <= lo < hi:
        raise ValueError(f"bad token range {cfg.token_range}")
    rng = np.random.default_rng(cfg.seed)
    which = assign_adapters(
        cfg.popularity, cfg.num_requests, len(models), cfg.batch, cfg.powerlaw_alpha, rng
    )
    in_lens = draw_lengths(cfg.input_len, cfg.num_requests, rng)
    out_lens = draw_lengths(cfg.output_len, cfg.num_requests, rng)
    arrivals = arrival_times(cfg, rng)
    return [
        RequestSpec(
            index=i,
            model=models[which[i]],
            prompt=[int(t) for t in rng.integers(lo, hi, size=in_lens[i])],
            max_tokens=out_lens[i],
            arrival_s=arrivals[i],
        )
        for i in range(cfg.num_requests)
    ]


def workload_config(
    args: argparse.Namespace, popularity: str | None = None, seed_offset: int = 0
) -> WorkloadConfig:
    """The workload the options describe (``compare`` passes each popularity and repeat)."""
    return WorkloadConfig(
        num_requests=args.num_requests,
        popularity=popularity or getattr(args, "popularity", "distinct"),
        powerlaw_alpha=args.powerlaw_alpha,
        batch=args.concurrency,
        input_len=args.input_len,
        output_len=args.output_len,
        request_rate=args.request_rate,
        burstiness_cv=args.burstiness,
        token_range=args.token_range,
        seed=args.seed + seed_offset,
    )
