"""dpo_lib.logprobs.sparse_embedding_grad: the tied embedding's gradient without a dense [V, d] fill.

The arithmetic: the tied weight W is used twice, as the embedding (rows of the batch's tokens) and as
the LM head. dL/dW = G_head (dense, every row) + G_emb (non-zero only on rows of tokens in the batch).
With the lever, G_emb is sparse and added row by row: the sum is the same tensor up to the order in
which a repeated token's rows are added, so it matches the dense run to float32 rounding, rows of
tokens not in the batch exactly (they hold G_head alone), and ``.grad`` stays a dense tensor.
"""

import pytest
import torch
from _tiny import tiny, toy_rows, train_config

from dpo_lib.features import collate, tokenize_rows
from dpo_lib.logprobs import concatenated_forward, sparse_embedding_grad
from dpo_lib.reference import FrozenReference, precompute_reference_logps
from dpo_lib.trainer import DPOTrainer


def _grad(model, batch, sparse: bool, compact: bool = True) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with sparse_embedding_grad(model, sparse):
        chosen, rejected = concatenated_forward(model, batch, compact_head=compact)
    (chosen.sum() - 0.5 * rejected.sum()).backward()
    return model.get_input_embeddings().weight.grad


@pytest.mark.parametrize("compact", [True, False])
def test_same_gradient_dense_tensor_and_flag_restored(compact):
    model, tok = tiny()
    features, _ = tokenize_rows(tok, toy_rows(6), max_length=64)
    batch = collate(features, tok.pad_token_id)
    dense = _grad(model, batch, sparse=False, compact=compact).clone()
    sparse = _grad(model, batch, sparse=True, compact=compact)
    assert not sparse.is_sparse and sparse.layout == torch.strided       # the fused AdamW needs a dense .grad
    assert model.get_input_embeddings().sparse is False                  # put back after the forward
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)     # a repeated token's rows: another order
    unused = torch.ones(dense.shape[0], dtype=torch.bool)
    unused[batch["input_ids"].unique()] = False                          # rows only the head touched
    assert unused.any()
    assert torch.equal(sparse[unused], dense[unused])


def test_left_alone_when_untied_or_frozen():
    model, tok = tiny()
    embedding = model.get_input_embeddings()
    embedding.weight.requires_grad_(False)                               # frozen (LoRA, a frozen trunk)
    with sparse_embedding_grad(model):
        assert embedding.sparse is False
    embedding.weight.requires_grad_(True)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())   # untied
    with sparse_embedding_grad(model):
        assert embedding.sparse is False
    with sparse_embedding_grad(torch.nn.Linear(2, 2)):                   # not a transformers model: nothing to do
        pass


def test_training_with_and_without_the_lever_agrees():
    """Four steps of the trainer with the lever on and off: the losses agree to float32 rounding carried
    through four AdamW updates (the lever only reorders a sum), and the final weights likewise."""
    losses, weights = {}, {}
    for on in (False, True):
        model, tok = tiny()
        features, _ = tokenize_rows(tok, toy_rows(16), max_length=64)
        features = precompute_reference_logps(FrozenReference(model), features, tok.pad_token_id)
        config = train_config(batch_size=4, max_steps=4, learning_rate=1e-3, sparse_embedding_grad=on, print_every=0)
        history = DPOTrainer(model, features, config, pad_token_id=tok.pad_token_id).train(progress=False)
        losses[on] = [h["loss"] for h in history]
        weights[on] = model.get_input_embeddings().weight.detach().clone()
    assert losses[True][0] == pytest.approx(0.6931471805599453, abs=1e-6)
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    torch.testing.assert_close(weights[True], weights[False], rtol=1e-5, atol=1e-6)
    assert not torch.equal(weights[True], tiny()[0].get_input_embeddings().weight)   # it trained
