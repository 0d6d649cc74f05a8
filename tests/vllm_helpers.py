"""Helpers shared by the vLLM engine and HTTP tests: random adapters and a transformers reference.

The reference applies each adapter's dense delta_W to a transformers copy of the base and runs
greedy decoding in float32, so vLLM's output can be compared token for token and logprob for
logprob.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from moka_core.adapter_format import MokaAdapter
from moka_core.base_models import llama_dims, tiny_llama_dir
from moka_serve.bench.random_adapters import module_path, write_moka  # noqa: F401 (re-exported)
from moka_serve.bench.random_adapters import random_moka as _random_moka
from moka_serve.bench.random_adapters import write_random_lora as _write_random_lora
from moka_serve.bench.server import ServerError, free_port  # noqa: F401 (re-exported)
from moka_serve.bench.server import running_server as _running_server

# Projection shapes and layer count of the tiny Llama (moka_core.base_models.build_tiny_llama,
# default sizes), read from its config.json: hidden 256, 4 layers, 4 heads / 2 KV heads.
TINY_DIMS, TINY_LAYERS = llama_dims(tiny_llama_dir())


def random_moka(components: dict[str, list[list[int]]], **kw) -> MokaAdapter:
    """``moka_serve.bench.random_adapters.random_moka`` over the tiny Llama by default."""
    kw.setdefault("dims", TINY_DIMS)
    kw.setdefault("layers", TINY_LAYERS)
    return _random_moka(components, **kw)


def write_random_lora(folder: Path, targets: list[str], **kw) -> dict[str, torch.Tensor]:
    """``moka_serve.bench.random_adapters.write_random_lora`` over the tiny Llama by default."""
    kw.setdefault("dims", TINY_DIMS)
    kw.setdefault("layers", TINY_LAYERS)
    return _write_random_lora(folder, targets, **kw)


def moka_deltas(adapter: MokaAdapter) -> dict[str, torch.Tensor]:
    """HF module path -> dense float64 delta_W."""
    return {p: adapter.delta_weight(p) for p in adapter.modules}


class Reference:
    """A transformers copy of the base; ``generate`` merges a delta set, decodes greedily."""

    def __init__(self, base_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(base_dir), torch_dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.original = {k: v.clone() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[int], max_tokens: int, deltas: dict[str, torch.Tensor] | None
    ) -> tuple[list[int], list[float]]:
        """Greedy tokens and the log-probability of each chosen token."""
        self.model.load_state_dict(self.original)
        params = dict(self.model.named_parameters())
        for path, delta in (deltas or {}).items():
            w = params[f"{path}.weight"]
            w.copy_((w.double() + delta).to(w.dtype))
        ids = list(prompt_ids)
        tokens, logprobs = [], []
        for _ in range(max_tokens):
            logits = self.model(torch.tensor([ids])).logits[0, -1].double()
            lp = torch.log_softmax(logits, dim=-1)
            t = int(torch.argmax(lp))
            tokens.append(t)
            logprobs.append(float(lp[t]))
            ids.append(t)
        return tokens, logprobs


@contextmanager
def running_server(
    cmd: list[str], env: dict, log: Path, port: int, timeout_s: float
) -> Iterator[str]:
    """``moka_serve.bench.server.running_server``, failing the test (with the log) if it dies."""
    try:
        with _running_server(cmd, env, log, port, timeout_s) as url:
            yield url
    except ServerError as e:
        pytest.fail(str(e))


# --- The mixed batch shared by the engine tests (compiled and eager) ---------------------------

MAX_TOKENS = 8
LOGPROB_TOL = 1e-4
MIXED_NAMES = ["moka-qkv", "mokas-o-down", "moka-o-gateup", "lora-qvdown"]


def mixed_adapters(workdir: Path) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """name -> (folder, dense deltas by HF module path): MoKA on all three qkv slices (k's
    narrower GQA slice included) in moka-train's mixed family, MoKAs on row-parallel
    o_proj/down_proj, merged gate_up and o_proj with lopsided shapes and rank-1 groups, and a
    LoRA."""
    out = {}
    a = random_moka(
        {
            # moka-train's default (mixed) form: a balanced term plus 7, 3 and 1 rank-1 terms
            # (served as one rank-7/3/1 pair each, under MOKA_MAX_COMPONENTS=4).
            "q_proj": [[16, 16, 16, 16]] + [[256, 1, 1, 256]] * 7,
            "k_proj": [[8, 32, 16, 8]] + [[128, 1, 1, 256]] * 3,
            "v_proj": [[8, 16, 16, 16], [128, 1, 1, 256]],
        },
        seed=1,
    )
    out["moka-qkv"] = (write_moka(workdir / "moka-qkv", a), moka_deltas(a))
    b = random_moka(
        {"o_proj": [[16, 16, 16, 16]], "down_proj": [[16, 16, 16, 32], [8, 8, 32, 64]]},
        seed=2,
        variant="mokas",
        std=0.3,
    )
    out["mokas-o-down"] = (write_moka(workdir / "mokas-o-down", b), moka_deltas(b))
    c = random_moka(
        {
            # rank-1 groups on a row-parallel and a merged column-parallel layer (TP shards)
            "o_proj": [[4, 64, 64, 4], [32, 8, 8, 32]] + [[256, 1, 1, 256]] * 3,
            "gate_proj": [[32, 16, 16, 16]] + [[512, 1, 1, 256]] * 2,
            "up_proj": [[16, 16, 32, 16]],
        },
        seed=3,
        gating=False,
        scaling=0.5,
    )
    out["moka-o-gateup"] = (write_moka(workdir / "moka-o-gateup", c), moka_deltas(c))
    lora_dir = workdir / "lora-qvdown"
    out["lora-qvdown"] = (
        lora_dir,
        write_random_lora(lora_dir, ["q_proj", "v_proj", "down_proj"], seed=4),
    )
    return out


def tiny_prompts(base_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    texts = [
        "The quick brown fox",
        "12 + 7 = 19, and 3 * 4 =",
        "Once upon a time",
        "hello world, said the",
        "Numbers: one two three",
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def collect_dead_engines() -> None:
    """Collect earlier modules' engines now, before a new one is built in this process.

    An ``LLM`` sits in reference cycles, so ``del`` leaves it to the cyclic GC, whose shutdown
    destroys vLLM's process-wide parallel groups: run in the middle of the next engine's
    construction, it kills that engine's groups ("tensor model parallel group is not
    initialized").
    """
    import gc

    gc.collect()


@contextmanager
def tiny_engine(base_dir: Path, engine_args: dict | None = None, **env_vars: str) -> Iterator:
    """The in-process engine of the engine tests (``collective_rpc`` can then run test
    functions on the worker): fp32, ``max_loras=2`` < the 4 adapters of the mixed batch,
    ``max_cpu_loras=4``; ``env_vars`` are set while it is built and used."""
    env = pytest.MonkeyPatch()
    env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for key, value in env_vars.items():
        env.setenv(key, value)
    from vllm import LLM

    args = dict(
        model=str(base_dir),
        enable_lora=True,
        max_loras=2,
        max_cpu_loras=4,
        max_lora_rank=16,
        dtype="float32",
        max_model_len=128,
        max_num_seqs=8,
        seed=0,
    )
    collect_dead_engines()
    engine = LLM(**(args | (engine_args or {})))
    try:
        yield engine
    finally:
        del engine
        env.undo()


_ids: dict[str, int] = {}


def lora_request(name: str, path: Path, served_as: str | None = None, **kw):
    """A ``LoRARequest`` with one stable id per ``name`` (for the whole pytest process), served
    under ``served_as`` when given (two ids under one served name); ``kw``: more fields."""
    from vllm.lora.request import LoRARequest

    if name not in _ids:
        _ids[name] = len(_ids) + 1
    return LoRARequest(served_as or name, _ids[name], str(path), **kw)


def _greedy(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True)


def _tokens_and_logprobs(output) -> tuple[list[int], list[float]]:
    c = output.outputs[0]
    lps = [step[t].logprob for t, step in zip(c.token_ids, c.logprobs, strict=True)]
    return list(c.token_ids), lps


def run(llm, prompt_ids_list, requests, max_tokens: int = MAX_TOKENS):
    """Greedy ``(tokens, logprobs)`` per prompt from an offline engine."""
    from vllm.inputs import TokensPrompt

    outs = llm.generate(
        [TokensPrompt(prompt_token_ids=p) for p in prompt_ids_list],
        _greedy(max_tokens),
        lora_request=requests,
        use_tqdm=False,
    )
    return [_tokens_and_logprobs(o) for o in outs]


def run_with_a_change_midway(llm, prompt_ids, request, change, max_tokens: int = MAX_TOKENS):
    """Greedy ``(tokens, logprobs)`` of one request through the engine's steps, ``change()``
    called after its first step (the prompt's), while the request still runs."""
    from vllm.inputs import TokensPrompt

    engine = llm.llm_engine
    engine.add_request("midway", TokensPrompt(prompt_token_ids=prompt_ids), _greedy(max_tokens),
                       lora_request=request)  # fmt: skip
    engine.step()
    change()
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    (out,) = done
    return _tokens_and_logprobs(out)


def check_against_reference(reference, prompt, deltas, got):
    tokens, lps = got
    ref_tokens, ref_lps = reference.generate(prompt, len(tokens), deltas)
    assert tokens == ref_tokens
    diff = max(abs(a - b) for a, b in zip(lps, ref_lps, strict=True))
    assert diff < LOGPROB_TOL, f"logprob difference {diff}"


def check_mixed_batch(llm, reference, adapters, prompts) -> None:
    """Base + every adapter of :func:`mixed_adapters` in one batch, twice over (so slots are
    evicted and reloaded when ``max_loras`` < 4): each output equals the merged reference, and
    every adapter changes the output of the same prompt."""
    batch_names = [None, *MIXED_NAMES, None, *reversed(MIXED_NAMES)]
    batch_prompts = [prompts[i % len(prompts)] for i in range(len(batch_names))]
    reqs = [None if n is None else lora_request(n, adapters[n][0]) for n in batch_names]
    outs = run(llm, batch_prompts, reqs)
    for name, prompt, got in zip(batch_names, batch_prompts, outs, strict=True):
        deltas = None if name is None else adapters[name][1]
        check_against_reference(reference, prompt, deltas, got)
    base = run(llm, [prompts[0]], [None])[0][0]
    for name in MIXED_NAMES:
        got = run(llm, [prompts[0]], [lora_request(name, adapters[name][0])])[0]
        assert got[0] != base, name
