"""Send a workload to an OpenAI-compatible server and time every token of every request.

Each request is one streamed ``/v1/completions`` call with a token-id prompt, greedy, and
``ignore_eos`` (a vLLM extension) so it produces exactly ``max_tokens`` tokens; usage is asked
for in the stream so output tokens are counted by the server, not guessed from chunks. Times are
``time.perf_counter`` on the client: TTFT is request start -> first chunk with a choice, ITL the gaps
between later chunks, TPOT ``(e2e - TTFT) / (output_tokens - 1)``, as ``vllm bench serve``
defines them. A failed request is recorded with its error and never retried.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from .workload import RequestSpec


@dataclass
class RequestResult:
    """What happened to one request (times in seconds from the run's start)."""

    index: int
    model: str
    prompt_tokens: int
    max_tokens: int
    ok: bool = False
    error: str | None = None
    start_s: float = 0.0
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


async def send_one(client, spec: RequestSpec, t0: float, extra_body: dict) -> RequestResult:
    """Stream one completion; every failure (HTTP error, broken stream) ends in the result."""
    res = RequestResult(spec.index, spec.model, len(spec.prompt), spec.max_tokens)
    start = time.perf_counter()
    res.start_s = start - t0
    last = None
    try:
        stream = await client.completions.create(
            model=spec.model,
            prompt=spec.prompt,
            max_tokens=spec.max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, **extra_body},
        )
        async for chunk in stream:
            now = time.perf_counter()
            # A token can decode to no text yet (half a UTF-8 character), so every chunk with
            # a choice counts as output, text or not; the usage-only last chunk has none.
            if chunk.choices:
                if last is None:
                    res.ttft_s = now - start
                else:
                    res.itl_s.append(now - last)
                last = now
            if chunk.usage is not None:
                res.output_tokens = chunk.usage.completion_tokens
        res.e2e_s = time.perf_counter() - start
        if res.ttft_s is None:
            res.error = "no tokens in the response"
        elif res.output_tokens != spec.max_tokens:
            res.error = f"{res.output_tokens} output tokens, asked for {spec.max_tokens}"
        else:
            res.ok = True
    except Exception as e:  # noqa: BLE001 - any failure is a result, never a crash of the run
        res.error = f"{type(e).__name__}: {e}"
        res.e2e_s = time.perf_counter() - start
    return res


async def run_workload(
    base_url: str,
    specs: list[RequestSpec],
    *,
    concurrency: int = 8,
    timeout_s: float = 600.0,
    api_key: str = "none",
    progress: bool = True,
    extra_body: dict | None = None,
) -> tuple[list[RequestResult], float]:
    """Run ``specs`` (closed loop at ``concurrency``, or at their arrival times, at most
    ``concurrency`` in flight); return the results in request order and the wall time."""
    import openai

    client = openai.AsyncOpenAI(
        base_url=base_url.rstrip("/") + "/v1", api_key=api_key, max_retries=0, timeout=timeout_s
    )
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), desc="requests", unit="req", leave=False)
    gate = asyncio.Semaphore(max(1, concurrency))
    t0 = time.perf_counter()

    async def one(spec: RequestSpec) -> RequestResult:
        if spec.arrival_s is not None:
            await asyncio.sleep(max(0.0, t0 + spec.arrival_s - time.perf_counter()))
        async with gate:
            r = await send_one(client, spec, t0, extra_body or {})
        if bar is not None:
            bar.update(1)
        return r

    try:
        results = await asyncio.gather(*(one(s) for s in specs))
    finally:
        if bar is not None:
            bar.close()
        await client.close()
    return list(results), time.perf_counter() - t0
