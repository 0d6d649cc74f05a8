"""MoKA as a PEFT method (``moka_peft``): the PEFT calls users make, on the tiny Llama, against
the project's own format reader and merged reference (``moka_core.reference``)."""

from __future__ import annotations

import json
import os

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import moka_peft  # noqa: E402,F401  (registers the method)
from moka_core.adapter_format import load_adapter  # noqa: E402
from moka_core.base_models import tiny_llama_dir  # noqa: E402
from moka_peft import MokaPeftConfig  # noqa: E402
from moka_serve.bench.random_adapters import random_moka, write_moka  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 7, 99, 3]])
TARGETS = {
    # moka-train's mixed form: a balanced term plus rank-1 terms; v_proj is GQA-narrow (128).
    "q_proj": {"components": [[16, 16, 16, 16], [256, 1, 1, 256], [256, 1, 1, 256]]},
    "v_proj": {"components": [[8, 16, 16, 16]]},
}


def _base():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir()), dtype=torch.float32).eval()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _trained(scaling: float = 2.0):
    """A PEFT MoKA model whose factors are all non-zero (as after training)."""
    model = peft.get_peft_model(_base(), MokaPeftConfig(targets=json.loads(json.dumps(TARGETS)),
                                                        scaling=scaling))  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "moka_" in name:
                p.normal_(0, 0.05)
    return model


def test_get_peft_model_trains_only_the_factors_and_starts_at_zero():
    base_logits = _logits(_base())
    model = peft.get_peft_model(_base(), MokaPeftConfig(targets=json.loads(json.dumps(TARGETS))))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".moka_" in n for n in trainable)
    assert torch.equal(_logits(model), base_logits)  # A starts at zero: the update is zero
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    opt.step()
    assert not torch.allclose(_logits(model), base_logits)


def test_save_pretrained_writes_format_v1_that_the_server_reads(tmp_path):
    model = _trained()
    model.save_pretrained(tmp_path / "ad")
    adapter = load_adapter(tmp_path / "ad")  # the server's reader, strict about keys
    assert adapter.config.target_modules == ["q_proj", "v_proj"]
    assert adapter.config.targets["v_proj"].out_features == 128
    layers = dict(model.base_model.model.named_modules())
    for path in adapter.modules:
        want = layers[path].get_delta_weight("default").double()
        assert torch.allclose(adapter.delta_weight(path), want, atol=1e-6), path


@pytest.mark.parametrize("variant", ["moka", "mokas"])
def test_from_pretrained_reads_a_format_v1_folder_as_the_reference_merges_it(tmp_path, variant):
    """A folder written by the project's writer (as moka-train writes one), MoKAs too."""
    from moka_core.reference import load_reference_model

    comps = {"q_proj": [[16, 16, 16, 16], [256, 1, 1, 256]], "down_proj": [[16, 32, 16, 16]]}
    if variant == "mokas":
        comps = {"o_proj": [[16, 16, 16, 16]], "down_proj": [[16, 16, 16, 32]]}
    folder = write_moka(tmp_path / variant, random_moka(comps, seed=3, variant=variant, std=0.2,
                        dims=_dims(), layers=4))  # fmt: skip
    loaded = peft.PeftModel.from_pretrained(_base(), folder)
    want = _logits(load_reference_model(tiny_llama_dir(), adapter_dir=folder))
    assert (_logits(loaded) - want).abs().max() < 1e-5
    merged = loaded.merge_and_unload()
    assert not any("moka" in n for n, _ in merged.named_modules())
    assert (_logits(merged) - want).abs().max() < 1e-5


# A model read back from its folder computes the same float32 logits up to a few ulps (1.7e-6 on
# logits of magnitude 3.2 on an AVX2 machine, where the GEMMs round differently than with
# AVX-512); two different adapters differ by far more.
LOGITS_ATOL = 1e-5


def test_round_trip_several_adapters_and_disable(tmp_path):
    first = _trained()
    first.save_pretrained(tmp_path / "a")
    want_a = _logits(first)
    second = _trained(scaling=-3.0)
    second.save_pretrained(tmp_path / "b")
    want_b = _logits(second)
    model = peft.PeftModel.from_pretrained(_base(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert torch.allclose(_logits(model), want_a, atol=LOGITS_ATOL)
    model.set_adapter("b")
    assert torch.allclose(_logits(model), want_b, atol=LOGITS_ATOL)
    with model.disable_adapter():
        assert torch.allclose(_logits(model), _logits(_base()), atol=LOGITS_ATOL)
    model.delete_adapter("a")
    assert torch.allclose(_logits(model), want_b, atol=LOGITS_ATOL)


def test_over_a_4bit_base_and_merged_into_it():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    from moka_core.bnb_cpu import keep_portable_4bit_layout

    base = AutoModelForCausalLM.from_pretrained(
        str(tiny_llama_dir()), quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    plain = _logits(keep_portable_4bit_layout(base))  # before any no-grad forward (see bnb_cpu)
    model = peft.get_peft_model(base, MokaPeftConfig(targets=json.loads(json.dumps(TARGETS)),
                                                     scaling=2.0))  # fmt: skip
    torch.manual_seed(0)
    with torch.no_grad():  # an update well above NF4's rounding of the merged weight
        for name, p in model.named_parameters():
            if "moka_" in name:
                p.normal_(0, 0.3)
    adapted = _logits(model)
    assert not torch.allclose(adapted, plain)
    merged = model.merge_and_unload()  # dequantize, add, quantize again (PEFT's bnb backend)
    # NF4 requantization of the merged weight moves logits a little, far less than the update.
    assert (_logits(merged) - adapted).abs().max() < 0.25 * (adapted - plain).abs().max()


def _dims():
    from moka_core.base_models import llama_dims

    return llama_dims(tiny_llama_dir())[0]


def test_transformers_load_adapter_and_auto_peft_model_read_a_moka_folder(tmp_path):
    from peft import AutoPeftModelForCausalLM

    model = _trained()
    want = _logits(model)
    model.save_pretrained(tmp_path / "ad")
    plain = _base()
    plain.load_adapter(str(tmp_path / "ad"))  # transformers' own PEFT integration
    assert torch.allclose(_logits(plain), want, atol=LOGITS_ATOL)
    auto = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "ad"))  # base from the config
    assert torch.allclose(_logits(auto.eval()), want, atol=LOGITS_ATOL)


def _load_4bit():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from moka_core.bnb_cpu import keep_portable_4bit_layout

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    return keep_portable_4bit_layout(AutoModelForCausalLM.from_pretrained(
        str(tiny_llama_dir()), quantization_config=quant, device_map="cpu", dtype=torch.float32
    ))  # fmt: skip


def test_config_plans_all_linear_at_a_loras_size_with_moka_trains_defaults():
    """``target_modules="all-linear"`` + ``budget="lora-4"``: every linear layer but lm_head, the
    mixed family at a rank-4 LoRA's size, gated, each component starting at LoRA's 2."""
    from moka_core.shapes import lora_params

    model = peft.get_peft_model(_base(), MokaPeftConfig(target_modules="all-linear",
                                                        budget="lora-4"))  # fmt: skip
    cfg = model.peft_config["default"]
    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert sorted(cfg.target_modules) == names
    comps = {t: [tuple(c) for c in spec["components"]] for t, spec in cfg.targets.items()}
    assert all(
        len(c) == 4 and c[0][1] > 1 and all(x[1] == 1 for x in c[1:]) for c in comps.values()
    )
    assert cfg.gating and cfg.scaling == 8.0
    dims = {t: (cfg.targets[t]["out_features"], cfg.targets[t]["in_features"]) for t in names}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rank4 = lora_params(dims, dict.fromkeys(names, 4), 4)
    assert rank4 <= trainable <= rank4 * 1.005
    one = peft.get_peft_model(_base(), MokaPeftConfig(target_modules=["q_proj"], budget="lora-1"))
    assert not one.peft_config["default"].gating and one.peft_config["default"].scaling == 2.0
    with pytest.raises(ValueError, match="match no linear layer"):
        peft.get_peft_model(_base(), MokaPeftConfig(target_modules=["nope"]))


def test_sft_trainer_over_a_4bit_base_saves_an_adapter_the_server_loads(tmp_path):
    """TRL's ``SFTTrainer(peft_config=MokaPeftConfig(...))`` on prompt/completion records over
    an NF4 base: the saved folder passes the server's precheck and reader, and PEFT reloads it
    to the trained model's logits."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    env = dict(os.environ)
    try:  # importing trl sets VLLM_LOGGING_LEVEL=ERROR for the process and its children
        from trl import SFTConfig, SFTTrainer
    finally:
        os.environ.clear()
        os.environ.update(env)

    from moka_core.adapter_check import folder_problem
    from moka_core.base_models import llama_dims

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir()))
    words = "red green blue black white water fire earth".split()
    rows = [{"prompt": f"Echo: {a} {b}\n", "completion": f"{a} {b} {a} {b}"}
            for a in words for b in words]  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                     learning_rate=1e-2, use_cpu=True, report_to="none", save_strategy="no",
                     logging_steps=1, disable_tqdm=True, bf16=False)  # fmt: skip
    trainer = SFTTrainer(
        model=_load_4bit(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=MokaPeftConfig(target_modules=["q_proj", "v_proj"], budget="lora-2"),
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and losses[-1] < losses[0]
    folder = tmp_path / "adapter"
    trainer.model.save_pretrained(folder)
    assert folder_problem(folder, llama_dims(tiny_llama_dir())) is None
    adapter = load_adapter(folder)
    assert adapter.config.gating and len(adapter.modules) == 8
    assert any(torch.count_nonzero(w.A[0]) for w in adapter.modules.values())  # it trained
    trainer.model.eval()
    want = _logits(trainer.model)
    reloaded = peft.PeftModel.from_pretrained(_load_4bit(), str(folder)).eval()
    torch.testing.assert_close(_logits(reloaded), want, rtol=0, atol=1e-4)
