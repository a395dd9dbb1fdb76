"""dpo_lib.tools.bench.worker: the token count the bench divides by, and the policy scoring as its own
reference before the first update (the full run is in test_bench.py)."""

import torch

from dpo_lib.features import collate
from dpo_lib.logprobs import concatenated_forward
from dpo_lib.models import tiny_model
from dpo_lib.tools.bench.worker import PolicyAsReference, pair_tokens


def test_pair_tokens_counts_the_prompt_twice():
    # prompt + chosen and prompt + rejected: 2*3 + 2 + 1 = 9 non-padding tokens
    assert pair_tokens({"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}) == 9
    assert pair_tokens({"prompt_ids": [], "chosen_ids": [4], "rejected_ids": [5, 6, 7]}) == 4


def test_policy_as_reference_scores_like_the_eval_mode_forward_and_restores_training():
    torch.manual_seed(0)
    model = tiny_model(99, seed=0).train()
    features = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10, 11, 12]},
                {"prompt_ids": [13], "chosen_ids": [14, 15, 16], "rejected_ids": [17]}]
    batch = collate(features, pad_token_id=2)
    chosen, rejected = PolicyAsReference(model, {"dtype": "fp32", "device": "cpu"})(batch)
    assert model.training                                             # the caller's mode comes back
    model.eval()
    with torch.no_grad():
        want_chosen, want_rejected = concatenated_forward(model, batch, compact_head=True)
    torch.testing.assert_close(chosen, want_chosen, rtol=0, atol=1e-6)
    torch.testing.assert_close(rejected, want_rejected, rtol=0, atol=1e-6)
    assert chosen.shape == rejected.shape == (2,) and not chosen.requires_grad
    assert (chosen < 0).all() and (rejected < 0).all()               # sums of log-probs of 2-3 tokens
