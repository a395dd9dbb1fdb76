"""The VRAM planner against numbers computed by hand, and against peft and autograd."""

from __future__ import annotations

import pytest
import torch

from dpo_lib.models import tiny_model
from dpo_lib.tools import vram

SMOL = vram.MODELS["SmolLM2-135M-Instruct"]
# SmolLM2-135M by hand: embedding 49152*576 = 28,311,552 (tied: no separate LM head);
# per layer q,o 2*576*576 + k,v 2*576*192 = 884,736; MLP 3*576*1536 = 2,654,208; 2 norms 1,152
# -> 3,540,096 * 30 = 106,202,880; final norm 576.
SMOL_PARAMS = 28_311_552 + 106_202_880 + 576
SMOL_LINEAR = 30 * (884_736 + 2_654_208)


def test_param_counts_by_hand():
    assert SMOL.params == SMOL_PARAMS == 134_515_008
    assert SMOL.linear_params == SMOL_LINEAR == 106_168_320


def test_spec_from_config_matches_the_model():
    model = tiny_model(99)
    spec = vram.model_spec(model)  # reads model.config
    assert spec.params == model.num_parameters() == 21_760
    assert (spec.q_dim, spec.kv_dim) == (32, 16)


def test_spec_from_config_counts_qwen2_qkv_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config)
    assert vram.ModelSpec.from_config(config).params == model.num_parameters()


def test_spec_from_size_is_close():
    spec = vram.ModelSpec.from_size(params=135e6, layers=30, hidden=576, vocab=49152)
    assert abs(spec.params - 135e6) < 2 * 576 * 30  # rounding the MLP width moves at most 3h/2 per layer


def test_weights_of_135m_in_bf16_is_270_mb():
    mem = vram.estimate(SMOL, mode="full", precision="bf16", precomputed_reference=True, micro_batch=1, seq_len=8)
    assert mem.weights == 2 * SMOL_PARAMS == 269_030_016  # ~270 MB
    coarse = vram.ModelSpec.from_size(params=135e6, layers=30, hidden=576, vocab=49152)
    full = vram.estimate(coarse, mode="full", precision="bf16", micro_batch=1, seq_len=8)
    assert full.weights == pytest.approx(270e6, rel=1e-3)
    assert vram.estimate(SMOL, mode="full", precision="fp32", micro_batch=1, seq_len=8).weights == 4 * SMOL_PARAMS


def test_adamw_states_are_8_bytes_per_trainable_param():
    lora = vram.estimate(SMOL, mode="lora", precision="bf16", lora_r=16, micro_batch=1, seq_len=8)
    n = vram.lora_trainable_params(SMOL, 16)
    assert lora.optimizer == 8 * n
    assert lora.gradients == 4 * n                     # fp32 adapters
    assert lora.weights == 2 * SMOL_PARAMS + 4 * n     # bf16 base + fp32 adapters
    full16 = vram.estimate(SMOL, mode="full", precision="bf16", micro_batch=1, seq_len=8)
    assert full16.optimizer == (8 + 4) * SMOL_PARAMS   # + fp32 master weights
    assert full16.gradients == 2 * SMOL_PARAMS
    full32 = vram.estimate(SMOL, mode="full", precision="fp32", micro_batch=1, seq_len=8)
    assert full32.optimizer == 8 * SMOL_PARAMS          # fp32 weights are their own master copy
    # the ZeRO paper's 16 bytes per parameter, in both precisions
    assert full16.weights + full16.gradients + full16.optimizer == 16 * SMOL_PARAMS
    assert full32.weights + full32.gradients + full32.optimizer == 16 * SMOL_PARAMS


def test_reference_memory():
    kw = dict(micro_batch=1, seq_len=8, precision="bf16")
    assert vram.estimate(SMOL, mode="full", **kw).reference == 2 * SMOL_PARAMS
    assert vram.estimate(SMOL, mode="full", precomputed_reference=True, **kw).reference == 0
    assert vram.estimate(SMOL, mode="lora", **kw).reference == 0      # adapter disabled
    assert vram.estimate(SMOL, mode="qlora", **kw).reference == 0


def test_qlora_weights_by_hand():
    n = vram.lora_trainable_params(SMOL, 16)
    mem = vram.estimate(SMOL, mode="qlora", precision="bf16", micro_batch=1, seq_len=8)
    q4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # NF4 + double-quantised constants: 4.127 bits
    assert q4 * 8 == pytest.approx(4.127, abs=1e-3)
    assert mem.weights == pytest.approx(SMOL_LINEAR * q4 + (SMOL_PARAMS - SMOL_LINEAR) * 2 + 4 * n)


def test_activation_and_logit_terms_by_hand():
    # A = (8 + 4b) h + 5 b q + 4 b I with b = 2: 16*576 + 10*576 + 8*1536 = 27,264 bytes per token and layer
    per_token = 30 * 27_264 + (4 + 4) * 576
    assert vram.activation_bytes_per_token(SMOL, "bf16") == per_token == 822_528
    assert vram.activation_bytes_per_token(SMOL, "bf16", gradient_checkpointing=True) == 30 * 2 * 576 + 27_264 + 8 * 576
    mem = vram.estimate(SMOL, mode="lora", precision="bf16", micro_batch=1, seq_len=100)
    assert mem.activations == 200 * per_token          # chosen + rejected: 2 * 1 * 100 tokens
    assert mem.logits == 2 * 200 * 49152 * 4 == 78_643_200


def test_cuda_overheads_only_on_a_gpu():
    gpu = vram.estimate(SMOL, mode="lora", micro_batch=1, seq_len=8, precision="bf16")
    cpu = vram.estimate(SMOL, mode="lora", micro_batch=1, seq_len=8, precision="fp32", cuda=False)
    assert gpu.total == pytest.approx(gpu.allocated * 1.1 + 2 ** 29)
    assert cpu.total == cpu.allocated


def test_precision_follows_the_hardware():
    assert vram.pick_precision("T4")[0] == "fp16"
    assert "no bf16" in vram.pick_precision("T4")[1]
    assert vram.pick_precision("A100-80GB")[0] == "bf16"
    assert vram.pick_precision("L4")[0] == "bf16"
    assert vram.pick_precision("cpu")[0] == "fp32"
    assert vram.pick_precision({"name": "V100", "memory_gib": 16, "bf16": False})[0] == "fp16"
    assert vram.plan(SMOL, "T4").precision == "fp16"
    assert vram.plan(SMOL, "H100").precision == "bf16"  # unique prefix of H100-80GB


def test_too_large_config_lowers_micro_batch_and_raises_accumulation():
    big = vram.plan(SMOL, "H100-80GB", mode="full", seq_len=1024, global_batch=64)
    small = vram.plan(SMOL, "T4", mode="full", seq_len=1024, global_batch=64)
    assert big.fits and small.fits
    assert small.micro_batch < big.micro_batch
    assert small.grad_accum > big.grad_accum
    for p in (big, small):
        assert p.micro_batch * p.grad_accum == 64
        assert p.memory.total <= p.gpu.memory_bytes
        # the next larger micro-batch would not have fit
        bigger = [d for d in range(p.micro_batch + 1, 65) if 64 % d == 0]
        if bigger:
            nxt = vram.estimate(SMOL, mode="full", seq_len=1024, micro_batch=bigger[0], precision=p.precision,
                                gradient_checkpointing=p.gradient_checkpointing, cuda=True)
            assert nxt.total > p.gpu.memory_bytes
    assert "accumulation: 16" in small.explain()


def test_gradient_checkpointing_only_when_needed():
    easy = vram.plan("SmolLM2-360M-Instruct", "A100-80GB", mode="lora", seq_len=256, global_batch=8)
    assert not easy.gradient_checkpointing and easy.grad_accum == 1
    hard = vram.plan("Llama-3.1-8B-Instruct", "T4", mode="qlora", seq_len=1024, global_batch=32)
    assert hard.fits and hard.gradient_checkpointing
    assert "not even micro-batch 1 fits without it" in hard.explain()
    impossible = vram.plan("Llama-3.1-8B-Instruct", "T4", mode="full", seq_len=1024, global_batch=32)
    assert not impossible.fits
    assert "DOES NOT FIT" in impossible.explain() and "mode='lora'" in impossible.explain()


def test_explain_gives_a_reason_for_every_choice():
    text = vram.plan("Qwen2.5-0.5B-Instruct", "L4", mode="lora", seq_len=512, global_batch=16).explain()
    for key in ("precision:", "reference:", "trainable:", "micro-batch:", "accumulation:", "gradient checkpointing:"):
        assert key in text
    assert "adapter disabled" in text
    table = vram.plan_table("SmolLM2-360M-Instruct", seq_len=512, global_batch=32)
    assert table.count("\n") == 1 + 4 * 3


def test_lora_count_by_hand_equals_peft():
    from peft import LoraConfig, get_peft_model

    # tiny config: h = 32, q = 4 heads * 8 = 32, kv = 2 * 8 = 16, I = 64, 2 layers
    # r = 4 on q, v: q 4*(32+32) = 256, v 4*(32+16) = 192 -> 448 per layer, 896 in all
    assert vram.lora_trainable_params(tiny_model(99), 4, ["q_proj", "v_proj"]) == 896
    # r = 8 on all 7: q,o 8*64 = 512 each, k,v 8*48 = 384 each, gate,up,down 8*96 = 768 each -> 4096 per layer
    assert vram.lora_trainable_params(tiny_model(99), 8) == 8192
    for r, targets in ((4, ["q_proj", "v_proj"]), (8, "all-linear")):
        model = tiny_model(99)
        peft_model = get_peft_model(model, LoraConfig(r=r, target_modules=targets))
        n = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert n == vram.lora_trainable_params(model.config, r, targets)
    with pytest.raises(ValueError, match="unknown target"):
        vram.lora_trainable_params(SMOL, 8, ["qkv"])


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_activation_formula_matches_what_autograd_saves(dtype, precision):
    model = tiny_model(99).to(dtype)
    B, T = 4, 48
    ids = torch.randint(0, 99, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, -5:] = 0  # a padding mask, as in DPO batches
    measured = vram.measure_saved_activations(model, ids, mask)
    estimated = B * T * vram.activation_bytes_per_token(model, precision)
    assert measured == pytest.approx(estimated, rel=0.10)


def test_unknown_names_say_what_is_known():
    with pytest.raises(KeyError, match="presets"):
        vram.model_spec("gpt-5")
    with pytest.raises(KeyError, match="T4"):
        vram.gpu_spec("Z80")
    with pytest.raises(ValueError, match="mode"):
        vram.estimate(SMOL, mode="half")
