"""Local base models (moka_core.base_models) and the merged-adapter reference (moka_core.reference).

The reference is what later serving tests compare vLLM against, so it is checked here against
independent computations: a hand-merged weight, a forward hook adding ``delta_W x`` beside a
4-bit layer and peft's own ``merge_and_unload``. vLLM's greedy tokens against it, base requests
included, are the mixed-batch test's (``test_vllm_plugin.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moka_core.adapter_format import (
    ComponentShape,
    MokaAdapter,
    MokaConfig,
    MokaModuleWeights,
    TargetSpec,
    save_adapter,
)
from moka_core.base_models import MARKER_NAME, build_tiny_llama, materialize_default_base
from moka_core.reference import (
    greedy_generate,
    load_reference_model,
    merge_lora_into_model,
    merge_moka_into_model,
)

transformers = pytest.importorskip("transformers")

PROMPTS = ["Hello world, the number is 42.", "What is the capital of France?"]
# Tiny model: hidden 256, 4 heads of 64, 2 kv heads -> q_proj 256x256, v_proj 256->128.
MOKA_TARGETS = {
    "q_proj": TargetSpec(256, 256, (ComponentShape(16, 16, 16, 16), ComponentShape(8, 32, 32, 8))),
    "v_proj": TargetSpec(256, 128, (ComponentShape(8, 16, 16, 16), ComponentShape(4, 8, 32, 32))),
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_dir)


def _random_moka(layers=(0, 2), seed: int = 0, scale: float = 0.05) -> MokaAdapter:
    """A gated MoKA adapter on q_proj/v_proj of some layers, with nonzero random factors."""
    gen = torch.Generator().manual_seed(seed)
    config = MokaConfig(
        target_modules=list(MOKA_TARGETS), targets=dict(MOKA_TARGETS), gating=True, scaling=2.0
    )
    modules = {}
    for layer in layers:
        for name, spec in MOKA_TARGETS.items():
            comps = spec.components
            modules[f"model.layers.{layer}.self_attn.{name}"] = MokaModuleWeights(
                A=[torch.randn(c.m1, c.n1, generator=gen) for c in comps],
                B=[torch.randn(c.m2, c.n2, generator=gen) * scale for c in comps],
                gate=torch.randn(len(comps), generator=gen),
            )
    adapter = MokaAdapter(config, modules)
    adapter.validate()
    return adapter


def _manual_delta(adapter: MokaAdapter, path: str) -> torch.Tensor:
    """scaling * sum_i softmax(gate)_i kron(A_i, B_i), written out independently of the format."""
    w = adapter.modules[path]
    alpha = torch.softmax(w.gate.double(), dim=0)
    pairs = enumerate(zip(w.A, w.B, strict=True))
    terms = [alpha[i] * torch.kron(a.double(), b.double()) for i, (a, b) in pairs]
    return adapter.config.scaling * sum(terms)


def _logits(model, tokenizer, prompt: str = PROMPTS[1]) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


# --------------------------------------------------------------------------- tiny llama


def test_tiny_llama_builds_and_is_deterministic(tiny_dir, tmp_path):
    again = build_tiny_llama(tmp_path / "again")
    other = build_tiny_llama(tmp_path / "other", seed=1)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name
    assert (tiny_dir / "model.safetensors").read_bytes() != (
        other / "model.safetensors"
    ).read_bytes()
    assert (tiny_dir / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()
    assert (tiny_dir / MARKER_NAME).is_file()


def test_tiny_llama_cache_reuses_complete_and_rebuilds_incomplete(tmp_path):
    dest = build_tiny_llama(tmp_path / "t", num_layers=1)
    mtime = (dest / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_llama(dest, num_layers=1) == dest
    assert (dest / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not rebuilt
    (dest / MARKER_NAME).unlink()  # as if a build had been interrupted
    build_tiny_llama(dest, num_layers=1)
    assert (dest / MARKER_NAME).is_file()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_tiny_tokenizer(tokenizer):
    assert len(tokenizer) == 1024
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id is not None
    for text in ("0123456789", "Hello, world! What is 12 + 30?", "the quick brown fox"):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
    for digit in "0123456789":  # every digit is a token of its own
        assert len(tokenizer.encode(digit)) == 1
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_llama_generates_prompt_dependent_text(tiny_dir, tokenizer):
    model = load_reference_model(tiny_dir)
    outs = [tuple(greedy_generate(model, tokenizer, p, 8, ignore_eos=True)) for p in PROMPTS]
    outs.append(tuple(greedy_generate(model, tokenizer, "The quick brown fox", 8, ignore_eos=True)))
    assert len(set(outs)) == len(outs)
    assert all(len(set(o)) > 1 for o in outs)  # not one token repeated forever
    ids = torch.tensor([tokenizer.encode(PROMPTS[0])])
    ref = model.generate(ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1] :].tolist()
    assert ref == list(outs[0])[: len(ref)]  # the hand-written loop agrees with transformers


def test_tiny_llama_loads_in_4bit_nf4(tiny_dir, tokenizer):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = load_reference_model(tiny_dir, quantize_4bit=True)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_state.quant_type == "nf4"
    full = load_reference_model(tiny_dir)
    err = (_logits(model, tokenizer) - _logits(full, tokenizer)).abs().max()
    assert 0 < err < 1.0  # quantized, but still the same model


# --------------------------------------------------------------------------- MoKA merge


def test_merge_moka_equals_manual_weight_update(tiny_dir, tokenizer):
    adapter = _random_moka()
    base = load_reference_model(tiny_dir)
    base_logits = _logits(base, tokenizer)
    manual = load_reference_model(tiny_dir)
    with torch.no_grad():
        for path in adapter.modules:
            w = manual.get_submodule(path).weight
            w.copy_((w.double() + _manual_delta(adapter, path)).float())
    merged = load_reference_model(tiny_dir)
    merge_moka_into_model(merged, adapter)
    got = _logits(merged, tokenizer)
    assert (got - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(got, _logits(manual, tokenizer), rtol=0, atol=1e-5)


def test_load_reference_model_reads_saved_moka(tiny_dir, tokenizer, tmp_path):
    adapter = _random_moka()
    save_adapter(adapter, tmp_path / "moka")
    direct = load_reference_model(tiny_dir)
    merge_moka_into_model(direct, adapter)
    loaded = load_reference_model(tiny_dir, adapter_dir=tmp_path / "moka")
    assert not loaded.training
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(direct, tokenizer))


def test_merge_moka_into_4bit_is_dequantized_plus_delta(tiny_dir, tokenizer):
    """Merged 4-bit model == 4-bit model with ``delta_W x`` added beside each target (served)."""
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    adapter = _random_moka()
    hooked = load_reference_model(tiny_dir, quantize_4bit=True)
    for path in adapter.modules:
        delta = _manual_delta(adapter, path).float()
        hooked.get_submodule(path).register_forward_hook(
            lambda mod, args, out, d=delta: out + args[0] @ d.T
        )
    merged = load_reference_model(tiny_dir, quantize_4bit=True)
    path = "model.layers.0.self_attn.q_proj"
    q4 = merged.get_submodule(path)
    dense = dequantize_4bit(q4.weight.data, q4.weight.quant_state).reshape(256, 256)
    merge_moka_into_model(merged, adapter)
    q = merged.get_submodule(path)
    assert type(q) is torch.nn.Linear and q.weight.dtype == torch.float32
    expected = (dense.double() + _manual_delta(adapter, path)).float()
    torch.testing.assert_close(q.weight.data, expected, rtol=0, atol=0)
    assert isinstance(merged.get_submodule("model.layers.1.self_attn.q_proj"), bnb.nn.Linear4bit)
    torch.testing.assert_close(
        _logits(merged, tokenizer), _logits(hooked, tokenizer), rtol=0, atol=1e-4
    )


def test_merge_moka_rejects_missing_module_and_bad_shape(tiny_dir):
    model = load_reference_model(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    missing = _random_moka(layers=(0, 9))  # the tiny model has 4 layers
    with pytest.raises(ValueError, match="does not exist"):
        merge_moka_into_model(model, missing)
    # an adapter whose v_proj spec has the q_proj dims: delta 256x256 vs weight 128x256
    spec = MOKA_TARGETS["q_proj"]
    bad = MokaAdapter(
        MokaConfig(target_modules=["v_proj"], targets={"v_proj": spec}, gating=False),
        {
            "model.layers.0.self_attn.v_proj": MokaModuleWeights(
                A=[torch.ones(c.m1, c.n1) for c in spec.components],
                B=[torch.ones(c.m2, c.n2) for c in spec.components],
                gate=None,
            )
        },
    )
    with pytest.raises(ValueError, match="shape"):
        merge_moka_into_model(model, bad)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # all-or-nothing


# --------------------------------------------------------------------------- LoRA merge


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_lora_equals_peft_merge_and_unload(tiny_dir, tokenizer, tmp_path, use_rslora):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2} if not use_rslora else {},
        init_lora_weights=False,  # random nonzero B, so the merge is not a no-op
        use_rslora=use_rslora,
    )
    peft_model = peft.get_peft_model(load_reference_model(tiny_dir), config)
    peft_model.save_pretrained(tmp_path / "lora")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["use_rslora"] is (
        use_rslora
    )
    expected = peft_model.merge_and_unload()
    ours = load_reference_model(tiny_dir)
    merge_lora_into_model(ours, tmp_path / "lora")
    exp_state = expected.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, exp_state[key], rtol=1e-6, atol=1e-6, msg=key)
    loaded = load_reference_model(tiny_dir, adapter_dir=tmp_path / "lora")
    base = load_reference_model(tiny_dir)
    assert (_logits(loaded, tokenizer) - _logits(base, tokenizer)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(loaded, tokenizer), _logits(expected, tokenizer))


# --------------------------------------------------------------------------- the real base


@pytest.mark.slow
def test_default_base_materializes_and_knows_paris():
    folder = materialize_default_base()  # ~35 s the first time, then cached
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    assert (folder / MARKER_NAME).is_file() and (folder / "generation_config.json").is_file()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = load_reference_model(folder)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    tokens = greedy_generate(model, tokenizer, prompt, 12)
    assert "Paris" in tokenizer.decode(tokens)
    assert tokens[-1] == tokenizer.eos_token_id  # "<|im_end|>": it stops by itself
