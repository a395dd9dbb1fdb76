"""dpo_lib against TRL 1.x DPOTrainer on the same tiny model and batch (pinned trl==1.16.0)."""

import copy

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="parity tests need the dev extra (datasets, trl)")
trl = pytest.importorskip("trl", reason="parity tests need the dev extra (trl)")

from _tiny import tiny, toy_rows, train_config  # noqa: E402

from dpo_lib.data import collate, tokenize_rows  # noqa: E402
from dpo_lib.logprobs import concatenated_forward  # noqa: E402
from dpo_lib.reference import FrozenReference, precompute_reference_logps  # noqa: E402
from dpo_lib.trainer import DPOTrainer  # noqa: E402

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected"]


def trl_trainer(model, ref, tok, rows, tmp_path, **overrides):
    args = dict(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), max_steps=2, learning_rate=1e-3,
                lr_scheduler_type="constant", beta=0.1, logging_steps=1, report_to="none", use_cpu=True,
                max_length=None, save_strategy="no", seed=0, bf16=False, max_grad_norm=1.0, weight_decay=0.0,
                optim="adamw_torch", disable_tqdm=True)
    args.update(overrides)
    return trl.DPOTrainer(model=model, ref_model=ref, args=trl.DPOConfig(**args),
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    policy, tok = tiny(seed=0)
    ref, _ = tiny(seed=1)  # a different reference: rewards are non-zero from the first batch
    rows = toy_rows(8)
    return policy, ref, tok, rows, tmp_path


def test_tokenization_matches_trl(setup):
    policy, ref, tok, rows, tmp = setup
    t = trl_trainer(copy.deepcopy(policy), copy.deepcopy(ref), tok, rows, tmp)
    ours, _ = tokenize_rows(tok, rows)
    for i, f in enumerate(ours):
        ex = t.train_dataset[i]
        assert (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) == \
               (f["prompt_ids"], f["chosen_ids"], f["rejected_ids"])


def test_logps_loss_and_rewards_match_trl_on_one_batch(setup):
    policy, ref, tok, rows, tmp = setup
    t = trl_trainer(copy.deepcopy(policy), copy.deepcopy(ref), tok, rows, tmp)
    inputs = t.data_collator([t.train_dataset[i] for i in range(len(rows))])
    t.model.train()
    trl_loss = t.compute_loss(t.model, inputs)
    trl_metrics = {k: v[-1] for k, v in t._metrics["train"].items()}
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    with torch.no_grad():
        trl_logps = t.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                            fused_lm_head=True).log_probs.sum(1)

    feats, _ = tokenize_rows(tok, rows)
    batch = collate(feats, tok.pad_token_id)
    ours = DPOTrainer(policy, feats, train_config(batch_size=len(rows), beta=0.1), tok.pad_token_id,
                      reference=FrozenReference(ref))
    loss, metrics = ours.compute_loss(batch)
    with torch.no_grad():
        our_logps = torch.cat(concatenated_forward(policy, batch))
    assert torch.allclose(our_logps, trl_logps, atol=1e-5)
    assert abs(loss.item() - trl_loss.item()) < 1e-5
    assert metrics["rewards/margins"] != 0.0
    for k in METRICS[1:]:
        assert metrics[k] == pytest.approx(trl_metrics[k], abs=1e-5), k


def test_two_training_steps_match_trl(setup):
    policy, _, tok, rows, tmp = setup
    ref_copy = copy.deepcopy(policy)
    t = trl_trainer(copy.deepcopy(policy), ref_copy, tok, rows, tmp)
    t.train()
    trl_logs = [h for h in t.state.log_history if "loss" in h]

    feats, _ = tokenize_rows(tok, rows)
    feats = precompute_reference_logps(FrozenReference(policy), feats, tok.pad_token_id)
    config = train_config(batch_size=len(rows), max_steps=2, learning_rate=1e-3, beta=0.1, warmup_ratio=0.0,
                         schedule="constant", max_grad_norm=1.0, print_every=0)
    ours = DPOTrainer(policy, feats, config, tok.pad_token_id)
    history = ours.train(progress=False)

    assert len(trl_logs) == len(history) == 2
    assert history[0]["loss"] == pytest.approx(0.693147, abs=1e-5)
    for mine, theirs in zip(history, trl_logs):
        for k in METRICS + ["grad_norm", "learning_rate"]:
            assert mine[k] == pytest.approx(theirs[k], abs=1e-5, rel=1e-4), k
    assert history[1]["rewards/margins"] != 0.0
    for (name, p), q in zip(policy.named_parameters(), t.model.parameters()):
        assert torch.allclose(p, q, atol=1e-5), name
