"""FLOPs and MFU of dpo_lib.tools.flops (shapes and peaks from dpo_lib.tools.specs) against counts done by hand
for the tiny test model."""

import pytest
import torch

from dpo_lib.models import tiny_model
from dpo_lib.tools.flops import dpo_flops_per_token, dpo_step_flops, measure_cpu_peak_flops, mfu, non_embedding_params
from dpo_lib.tools.specs import GPUS, model_spec, peak_flops

# tiny_model(vocab_size=99, hidden_size=32, num_layers=2): Llama, 4 heads of 8, 2 KV heads, MLP 64.
# One layer: q 32*32 = 1024, k 32*16 = 512, v 512, o 1024, gate/up/down 3 * 32*64 = 6144,
# two RMSNorms 2*32 = 64  ->  9280.  Two layers 18560, final norm 32  ->  N = 18592.
# Embedding 99*32 = 3168, tied with the LM head (counted apart, 2dV per scored position).
N, D, V = 18592, 32, 99


def test_non_embedding_params_by_hand():
    model = tiny_model(vocab_size=V, hidden_size=D, num_layers=2)
    assert non_embedding_params(model) == N
    assert sum(p.numel() for p in model.parameters()) == N + D * V  # tied: the head adds no parameters
    shape = model_spec(model)
    assert (shape.non_embedding_params, shape.hidden, shape.vocab, shape.layers) == (N, D, V, 2)


def test_untied_head_is_excluded_too():
    model = tiny_model(vocab_size=V, hidden_size=D, num_layers=2)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie
    assert sum(p.numel() for p in model.parameters()) == N + 2 * D * V
    assert non_embedding_params(model) == N


def test_dpo_step_flops_by_hand():
    shape = model_spec(tiny_model(vocab_size=V, hidden_size=D, num_layers=2))  # N, d, V and 2 layers, as above
    # 100 tokens, 40 of them scored completion tokens
    live = dpo_step_flops(shape, tokens=100, scored=40, reference="live")
    assert live["policy_forward"] == 2 * 18592 * 100 + 2 * 3168 * 40 == 3_971_840
    assert live["policy_backward"] == 4 * 18592 * 100 + 4 * 3168 * 40 == 7_943_680
    assert live["reference_forward"] == 3_971_840
    assert live["total"] == 15_887_360
    cached = dpo_step_flops(shape, tokens=100, scored=40, reference="cached")
    assert cached["reference_forward"] == 0 and cached["total"] == 11_915_520
    # per token: 6N + 6dV*s (+ 2N + 2dV*s live), s = 40/100
    assert dpo_flops_per_token(shape, 0.4, "live") == pytest.approx(158_873.6)
    assert dpo_flops_per_token(shape, 0.4, "cached") == pytest.approx(119_155.2)
    assert dpo_flops_per_token(shape, 0.4, "cached") * 100 == pytest.approx(cached["total"])
    # attention term: 2 * layers * context * d per token forward, x3 with the backward
    attn = dpo_step_flops(shape, tokens=100, scored=40, reference="cached", attention_context=10)
    assert attn["total"] - cached["total"] == 3 * (2 * 2 * 10 * 32) * 100
    with pytest.raises(ValueError):
        dpo_step_flops(shape, 1, 1, reference="frozen")


def test_mfu_and_peaks():
    assert mfu(1e12, 1.0, 4e12) == 0.25
    assert mfu(6e12, 2.0, GPUS["A100-80GB"].peak_flops) == pytest.approx(3e12 / 312e12)
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA L4") == 121e12
    assert peak_flops("Tesla T4") == 65e12
    assert peak_flops("Radeon 9000") is None
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, 1.0)


def test_cpu_peak_is_measured():
    assert measure_cpu_peak_flops(size=64, repeats=2, threads=1) > 0


# ----------------------------------------------------------------------------- the speed levers keep the maths

def _batch(n=6, seed=2):
    from _tiny import tiny, toy_rows

    from dpo_lib.features import collate, tokenize_rows
    model, tok = tiny(seed=seed)
    feats, _ = tokenize_rows(tok, toy_rows(n))
    return model, tok, feats, collate(feats, tok.pad_token_id)


@pytest.mark.parametrize("average", [False, True])
def test_compact_head_equals_the_full_forward_values_and_gradients(average):
    from dpo_lib.logprobs import concatenated_forward

    model, _, _, batch = _batch()
    params = [p for p in model.parameters()]
    weights = torch.linspace(-1, 2, 2 * batch["input_ids"].shape[0] // 2)
    full = torch.cat(concatenated_forward(model, batch, average=average))
    g_full = torch.autograd.grad((full * weights).sum(), params)
    compact = torch.cat(concatenated_forward(model, batch, average=average, compact_head=True))
    g_compact = torch.autograd.grad((compact * weights).sum(), params)
    assert torch.allclose(full, compact, atol=1e-4)
    for a, b in zip(g_full, g_compact):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_fused_head_log_probs_match_log_softmax_with_bias():
    from dpo_lib.logprobs import linear_token_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 13, bias=True)
    h = torch.randn(5, 8, requires_grad=True)
    t = torch.randint(0, 13, (5,))
    w = torch.randn(5)
    ours = linear_token_logprobs(h, head, t)
    grads = torch.autograd.grad((ours * w).sum(), [h, head.weight, head.bias])
    ref = torch.log_softmax(head(h), -1).gather(-1, t[:, None]).squeeze(-1)
    ref_grads = torch.autograd.grad((ref * w).sum(), [h, head.weight, head.bias])
    assert torch.allclose(ours, ref, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_compact_head_falls_back_where_it_cannot_reproduce_the_logits():
    from dpo_lib.logprobs import _compact_head_parts, concatenated_forward

    model, _, _, batch = _batch()
    assert _compact_head_parts(model) is not None
    model.config.final_logit_softcapping = 30.0  # e.g. Gemma 2: logits = 30 tanh(z / 30), not lm_head(h)
    assert _compact_head_parts(model) is None
    with torch.no_grad():
        assert torch.equal(torch.cat(concatenated_forward(model, batch, compact_head=True)),
                           torch.cat(concatenated_forward(model, batch)))


def test_sorted_micro_batches_and_compact_head_give_the_full_batch_step():
    from _tiny import train_config

    from dpo_lib.features import pair_length
    from dpo_lib.reference import FrozenReference, precompute_reference_logps
    from dpo_lib.trainer import DPOTrainer

    results = []
    for fast in (False, True):
        model, tok, feats, _ = _batch(n=8, seed=0)
        feats = precompute_reference_logps(FrozenReference(model), feats, tok.pad_token_id)
        config = train_config(batch_size=8, grad_accum=4 if fast else 1, sort_by_length=fast, compact_lm_head=fast,
                             max_steps=2, learning_rate=1e-3, warmup_ratio=0.0, schedule="constant", print_every=0)
        trainer = DPOTrainer(model, feats, config, tok.pad_token_id)
        if fast:  # each micro-batch holds pairs of similar length
            idx = trainer.local_indices(0)
            lengths = [pair_length(feats[i]) for i in idx]
            assert lengths == sorted(lengths)
        results.append((trainer.train(progress=False), model))
    (h0, m0), (h1, m1) = results
    for a, b in zip(h0, h1):
        for k in ("loss", "rewards/margins", "grad_norm", "num_tokens"):
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-4), k
    for p, q in zip(m0.parameters(), m1.parameters()):
        assert torch.allclose(p, q, atol=1e-5)


def test_shuffle_false_takes_pairs_in_file_order():
    from _tiny import train_config

    from dpo_lib.trainer import DPOTrainer

    model, tok, feats, _ = _batch(n=8)
    feats = [dict(f, ref_chosen_logps=0.0, ref_rejected_logps=0.0) for f in feats]
    trainer = DPOTrainer(model, feats, train_config(batch_size=4, shuffle=False), tok.pad_token_id)
    assert trainer.batch_indices(0) == [0, 1, 2, 3] and trainer.batch_indices(1) == [4, 5, 6, 7]
    assert DPOTrainer(model, feats, train_config(batch_size=4), tok.pad_token_id).batch_indices(0) != [0, 1, 2, 3]
