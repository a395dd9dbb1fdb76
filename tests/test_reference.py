"""dpo_lib.reference: a frozen copy stays frozen, precomputed log-probs equal a direct forward and are cached."""

from __future__ import annotations

import copy

import pytest
import torch
from _tiny import tiny, toy_rows

from dpo_lib.features import collate, tokenize_rows
from dpo_lib.logprobs import concatenated_forward
from dpo_lib.reference import FrozenReference, model_fingerprint, precompute_reference_logps


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny()
    features = tokenize_rows(tok, toy_rows(12))[0]
    return model, tok, features


def test_frozen_reference_is_a_frozen_deep_copy(setup):
    """Three SGD steps on the policy move its log-probs; the reference's stay bitwise the same."""
    model, tok, features = setup
    policy = copy.deepcopy(model)
    ref = FrozenReference(policy)
    assert ref.model is not policy and not ref.model.training
    assert all(not p.requires_grad for p in ref.model.parameters())
    assert all(p.requires_grad for p in policy.parameters())  # the policy itself is left trainable
    assert {p.data_ptr() for p in ref.model.parameters()}.isdisjoint(p.data_ptr() for p in policy.parameters())

    batch = collate(features[:4], tok.pad_token_id)
    before = ref(batch)
    assert not before[0].requires_grad
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    start = concatenated_forward(policy, batch)[0].detach()
    for _ in range(3):
        opt.zero_grad()
        (-concatenated_forward(policy, batch)[0].sum()).backward()
        opt.step()
    moved = concatenated_forward(policy, batch)[0].detach()
    assert (moved - start).abs().max() > 1.0  # the policy did learn
    after = ref(batch)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


def test_precompute_equals_a_direct_forward(setup):
    """Length-sorted batches of 5 (other padding) give the log-probs of one forward over all 12 pairs in file
    order, to float32 rounding (relative 1e-6; the sums are about -50 to -90 nats)."""
    model, tok, features = setup
    out = precompute_reference_logps(FrozenReference(model), features, tok.pad_token_id, batch_size=5)
    with torch.no_grad():
        chosen, rejected = concatenated_forward(copy.deepcopy(model).eval(), collate(features, tok.pad_token_id))
    got_c = torch.tensor([f["ref_chosen_logps"] for f in out])
    got_r = torch.tensor([f["ref_rejected_logps"] for f in out])
    torch.testing.assert_close(got_c, chosen, rtol=1e-6, atol=0)
    torch.testing.assert_close(got_r, rejected, rtol=1e-6, atol=0)
    # the features are copies with two keys added, the input left as it was
    assert all(set(o) == set(f) | {"ref_chosen_logps", "ref_rejected_logps"} for o, f in zip(out, features))
    assert "ref_chosen_logps" not in features[0]


def _raises(batch):
    raise AssertionError("the reference was called: the cache was not read")


def test_precompute_cache_hit_and_misses(setup, tmp_path):
    """First call computes and writes the cache; a second with the same model key and token ids reads it
    (a reference that raises is never called); another model key, or other pairs, misses it."""
    model, tok, features = setup
    first = precompute_reference_logps(FrozenReference(model), features, tok.pad_token_id, cache_dir=tmp_path,
                                       model_key="k1")
    files = list(tmp_path.glob("ref_logps-k1-*.json"))
    assert len(files) == 1
    again = precompute_reference_logps(_raises, features, tok.pad_token_id, cache_dir=tmp_path, model_key="k1")
    assert again == first  # the JSON floats round-trip exactly
    with pytest.raises(AssertionError, match="cache was not read"):
        precompute_reference_logps(_raises, features, tok.pad_token_id, cache_dir=tmp_path, model_key="k2")
    with pytest.raises(AssertionError, match="cache was not read"):
        precompute_reference_logps(_raises, features[:6], tok.pad_token_id, cache_dir=tmp_path, model_key="k1")
    with pytest.raises(AssertionError, match="cache was not read"):  # no model key: no cache
        precompute_reference_logps(_raises, features, tok.pad_token_id, cache_dir=tmp_path)


def test_model_fingerprint_changes_with_one_weight(setup):
    model, _, _ = setup
    twin = copy.deepcopy(model)
    fp = model_fingerprint(model)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert model_fingerprint(twin) == fp
    with torch.no_grad():
        twin.model.norm.weight[3] += 1e-3
    assert model_fingerprint(twin) != fp
    with torch.no_grad():
        twin.model.norm.weight[3] = model.model.norm.weight[3]
    assert model_fingerprint(twin) == fp  # the value, not the object's history
    assert model_fingerprint(tiny(seed=1)[0]) != fp


@pytest.mark.parametrize("compact_head,shared_prompt,padding_free", [(True, False, False), (True, True, False),
                                                                    (True, True, True)])
def test_reference_scores_pairs_the_way_it_is_told(setup, compact_head, shared_prompt, padding_free):
    """FrozenReference(model, compact_head=…, shared_prompt=…, padding_free=…) returns concatenated_forward's
    numbers with those switches, bitwise, and the full head's to float32 rounding (relative 1e-5 of sums of -50
    to -90 nats)."""
    model, tok, features = setup
    scoring = {"compact_head": compact_head, "shared_prompt": shared_prompt, "padding_free": padding_free}
    ref = FrozenReference(model, **scoring)
    batch = collate(features[:6], tok.pad_token_id)
    got = ref(batch)
    with torch.no_grad():
        want = concatenated_forward(ref.model, batch, **scoring)
        full = concatenated_forward(ref.model, batch)
    for g, w, f in zip(got, want, full):
        assert torch.equal(g, w)
        torch.testing.assert_close(g, f, rtol=1e-5, atol=0)
