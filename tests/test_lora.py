"""LoRA wiring on the tiny model: reference = base, only adapters train, merge round-trips, clear 4-bit errors."""

from __future__ import annotations

import copy
import importlib.util
import math

import pytest
import torch
from _tiny import tiny, toy_rows, train_config

from dpo_lib import lora
from dpo_lib import trainer as trainer_module
from dpo_lib.evaluation import implicit_reward_accuracy, sequence_kl
from dpo_lib.features import batch_to, collate, tokenize_rows
from dpo_lib.logprobs import concatenated_forward
from dpo_lib.reference import AdapterDisabledReference, precompute_reference_logps
from dpo_lib.sampling import generate
from dpo_lib.trainer import DPOTrainer


def _features(tok, n=8):
    features, _ = tokenize_rows(tok, toy_rows(n))
    return features


def _randomise_adapters(peft_model, seed=0):
    """LoRA's B starts at 0 (adapted == base); give it values so the two differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_pick_dtype_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert lora.pick_dtype() == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert lora.pick_dtype() == torch.float16           # T4, V100
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert lora.pick_dtype() == torch.bfloat16          # A100, L4, H100
    assert lora.pick_dtype("cpu") == torch.float32


def test_lora_model_starts_at_the_base_and_trains_only_adapters():
    model, tok = tiny()
    n_base = model.num_parameters()
    peft_model = lora.make_lora_model(model, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    trainable, total = lora.trainable_parameters(peft_model)
    assert trainable == 896 and total == n_base + 896   # see tests/tools/test_vram.py for the hand count
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())


def test_reference_logps_equal_the_base_model():
    model, tok = tiny()
    batch = collate(_features(tok), tok.pad_token_id)
    base = copy.deepcopy(model).eval()
    with torch.no_grad():
        base_chosen, base_rejected = concatenated_forward(base, batch)
    peft_model = lora.make_lora_model(model, r=4, alpha=8)
    _randomise_adapters(peft_model)
    ref_chosen, ref_rejected = AdapterDisabledReference(peft_model)(batch)
    torch.testing.assert_close(ref_chosen, base_chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_rejected, base_rejected, rtol=0, atol=1e-5)
    with torch.no_grad():
        pol_chosen, _ = concatenated_forward(peft_model, batch)
    assert (pol_chosen - base_chosen).abs().max() > 1e-2  # the adapter does change the policy


def test_dpo_steps_change_only_adapter_weights():
    model, tok = tiny()
    features = _features(tok, 8)
    peft_model = lora.make_lora_model(model, r=4, alpha=8)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    config = train_config(batch_size=4, max_steps=3, learning_rate=1e-2, warmup_ratio=0.0, print_every=0)
    trainer = DPOTrainer(peft_model, features, config, pad_token_id=tok.pad_token_id,
                         reference=AdapterDisabledReference(peft_model))
    history = trainer.train(progress=False)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0: policy == reference at step 0
    changed = {n for n, p in peft_model.named_parameters() if not torch.equal(p, before[n])}
    assert changed, "no weight changed"
    assert all("lora_" in n for n in changed), f"base weights changed: {sorted(n for n in changed if 'lora_' not in n)}"
    assert all(n in changed for n in before if "lora_B" in n)
    assert all(n in changed for n in before if "lora_A" in n)  # A moves once B is non-zero


def _adapter_model_and_logits():
    """A tiny peft model with non-zero adapters, a batch of ids and its logits: ``(peft_model, tok, ids, logits)``."""
    model, tok = tiny()
    peft_model = lora.make_lora_model(model, r=4, alpha=8)
    _randomise_adapters(peft_model)
    ids = torch.randint(3, len(tok), (2, 12))
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
    return peft_model, tok, ids, logits


def test_merge_and_save_round_trips(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    peft_model, tok, ids, expected = _adapter_model_and_logits()
    out = lora.merge_and_save(peft_model, tmp_path / "merged", tokenizer=tok)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "lora" in k]
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer_config.json").is_file()


def test_merged_copy_gives_the_adapter_logits_and_leaves_the_peft_model_alone():
    peft_model, _, ids, expected = _adapter_model_and_logits()
    with torch.no_grad():
        merged = lora.merged_copy(peft_model)
        got = merged(input_ids=ids).logits
        again = peft_model(input_ids=ids).logits
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, expected)          # the adapter model is bitwise unchanged
    with peft_model.disable_adapter(), torch.no_grad():
        base = peft_model(input_ids=ids).logits
    assert (base - expected).abs().max() > 1e-3  # the adapters were not zero: the test can fail


def test_merge_refuses_a_4bit_base():
    class Fake4bit:
        is_loaded_in_4bit = True

        def get_base_model(self):
            return self

    with pytest.raises(ValueError, match="4-bit"):
        lora.merge_and_save(Fake4bit(), "unused")


def test_adapter_disabled_reference_in_the_evaluation_equals_the_base():
    model, tok = tiny()
    features = _features(tok, 8)
    base = copy.deepcopy(model).eval()
    peft_model = lora.make_lora_model(model, r=4, alpha=8)
    _randomise_adapters(peft_model)
    reference = AdapterDisabledReference(peft_model)
    with_ref = precompute_reference_logps(reference, features, tok.pad_token_id)
    expected = implicit_reward_accuracy(peft_model, with_ref, tok.pad_token_id, beta=0.1)
    got = implicit_reward_accuracy(peft_model, features, tok.pad_token_id, beta=0.1, reference=reference)
    assert got["accuracy"] == expected["accuracy"]
    assert got["margin"] == pytest.approx(expected["margin"], abs=1e-6)
    samples = generate(peft_model, tok, ["q1 great?", "q2 awful?"], n=2, max_new_tokens=6, progress=False)
    kl, kl_se = sequence_kl(peft_model, reference, samples, tok.pad_token_id)
    ref_kl, ref_se = sequence_kl(peft_model, base, samples, tok.pad_token_id)
    assert kl == pytest.approx(ref_kl, abs=1e-4) and kl_se == pytest.approx(ref_se, abs=1e-4)


def test_trainer_moves_batches_to_the_model_device(monkeypatch):
    model, tok = tiny()
    peft_model = lora.make_lora_model(model, r=4, alpha=8)
    config = train_config(batch_size=4, max_steps=2, learning_rate=1e-2, warmup_ratio=0.0, print_every=0)
    trainer = DPOTrainer(peft_model, _features(tok, 8), config, pad_token_id=tok.pad_token_id,
                         reference=AdapterDisabledReference(peft_model))
    # the batch is moved with batch_to to the model's device before the loss
    calls = []
    monkeypatch.setattr(trainer_module, "batch_to",
                        lambda batch, device: calls.append(str(device)) or batch_to(batch, device))
    seen = []
    compute_loss = trainer.compute_loss
    monkeypatch.setattr(trainer, "compute_loss",
                        lambda batch: seen.append({v.device for v in batch.values()}) or compute_loss(batch))
    trainer.train_step()
    assert calls == ["cpu"]
    assert seen == [{trainer.device}]   # every tensor of the micro-batch, on the model's device


def test_4bit_without_cuda_says_so(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(lora.QLoRAUnavailable, match="CUDA GPU"):
        lora.load_4bit_model("unused")


def test_4bit_without_bitsandbytes_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "bitsandbytes" else real_find_spec(name, *a, **k))
    with pytest.raises(lora.QLoRAUnavailable, match=r"bitsandbytes.*pip install 'dpo_lib\[gpu\]'") as err:
        lora.load_4bit_model("unused")
    assert "not installed" in str(err.value)


def test_gradient_checkpointing_gives_the_same_update():
    """Checkpointing trades compute for memory; it must not change the numbers."""
    weights = []
    for ckpt in (False, True):
        model, tok = tiny()
        peft_model = lora.make_lora_model(model, r=4, alpha=8, gradient_checkpointing=ckpt)
        config = train_config(batch_size=4, max_steps=2, learning_rate=1e-2, warmup_ratio=0.0, print_every=0)
        DPOTrainer(peft_model, _features(tok, 8), config, pad_token_id=tok.pad_token_id,
                   reference=AdapterDisabledReference(peft_model)).train(progress=False)
        weights.append({n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad})
    assert weights[0].keys() == weights[1].keys()
    for n in weights[0]:
        torch.testing.assert_close(weights[0][n], weights[1][n], rtol=1e-5, atol=1e-6)
