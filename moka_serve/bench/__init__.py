"""``moka-bench``: serving benchmarks (workloads, an OpenAI streaming client, reports, compare).

Modules: ``workload`` (who asks for which adapter, lengths, arrivals), ``client`` (streams and
times each request), ``report`` (percentiles, JSON/Markdown), ``serve`` (one workload against a
running server), ``compare`` (one engine, base vs MoKA vs LoRA, interleaved), ``server`` (start
and stop a server subprocess), ``random_adapters`` (seeded MoKA/LoRA adapters for any Llama).
"""
