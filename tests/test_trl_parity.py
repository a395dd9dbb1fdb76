"""dpo_lib against TRL 1.x on the same tiny model and batch (pinned trl==1.16.0).

DPO: against ``trl.DPOTrainer`` end to end. SimPO and ORPO: against the loss methods of TRL's
experimental trainers (``CPOTrainer.cpo_loss`` with ``loss_type="simpo"``,
``ORPOTrainer.odds_ratio_loss``), called unbound with a small stand-in ``self``, on random
log-probs, and against ``get_batch_logps(average_log_prob=True)``, the per-token mean both feed
on. TRL 1.16 implements neither DPOP nor R-DPO, so there is nothing of TRL's to compare them
with: ``tests/test_losses.py`` checks them against hand arithmetic.
"""

import copy
import types
import warnings

import pytest
import torch

datasets = pytest.importorskip("datasets", reason="parity tests need the dev extra (datasets, trl)")
trl = pytest.importorskip("trl", reason="parity tests need the dev extra (trl)")

from _tiny import tiny, toy_rows, train_config  # noqa: E402

from dpo_lib.features import collate, tokenize_rows  # noqa: E402
from dpo_lib.logprobs import concatenated_forward  # noqa: E402
from dpo_lib.losses import chosen_nll, dpo_loss  # noqa: E402
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


# ---------------------------------------------------------------- SimPO and ORPO: TRL's loss methods, unbound

def trl_experimental():
    with warnings.catch_warnings():  # "APIs here are unstable": known, and why this test pins trl==1.16.0
        warnings.filterwarnings("ignore", message=".*trl.experimental")
        from trl.experimental.cpo import CPOTrainer
        from trl.experimental.orpo import ORPOTrainer
    return CPOTrainer, ORPOTrainer


def stand_in(**attrs):
    """The attributes TRL's loss methods read from ``self``; nothing else of a trainer."""
    return types.SimpleNamespace(accelerator=types.SimpleNamespace(device="cpu"), **attrs)


def random_pairs(B=16, seed=0, low=-5.0, high=-1e-3):
    """Summed log-probs and token counts whose per-token means spread over [low, high]: both branches of
    log(1 - e^x) (below and above -ln 2) for ORPO."""
    g = torch.Generator().manual_seed(seed)
    n_c, n_r = torch.randint(1, 40, (B,), generator=g), torch.randint(1, 40, (B,), generator=g)
    means = torch.linspace(low, high, B)                                 # evenly over the range, shuffled
    mean_c, mean_r = means[torch.randperm(B, generator=g)], means[torch.randperm(B, generator=g)]
    return mean_c * n_c, mean_r * n_r, n_c, n_r


@pytest.mark.parametrize("beta,gamma,eps", [(2.0, 0.5, 0.0), (2.5, 1.2, 0.0), (0.1, 0.5, 0.0), (2.0, 0.5, 0.2),
                                            (2.0, 0.0, 0.0)])
def test_simpo_matches_trl_cpo_loss(beta, gamma, eps):
    CPOTrainer, _ = trl_experimental()
    pc, pr, nc, nr = random_pairs(seed=1, low=-8.0)
    trl_self = stand_in(beta=beta, loss_type="simpo", simpo_gamma=gamma, label_smoothing=eps, alpha=0.0)
    # TRL's CPO feeds cpo_loss per-token means when loss_type is simpo (get_batch_logps(average_log_prob=True))
    trl_losses, trl_c, trl_r = CPOTrainer.cpo_loss(trl_self, pc / nc, pr / nr)
    losses, r_c, r_r = dpo_loss(pc, pr, None, None, beta=beta, loss_type="simpo", label_smoothing=eps,
                                simpo_gamma=gamma, chosen_num_tokens=nc, rejected_num_tokens=nr)
    assert torch.allclose(losses, trl_losses, atol=1e-6, rtol=1e-5)
    assert torch.allclose(r_c, trl_c, atol=1e-6) and torch.allclose(r_r, trl_r, atol=1e-6)
    assert trl_losses.std() > 0  # the pairs differ: not a comparison of constants


@pytest.mark.parametrize("lam", [0.1, 0.25, 1.0])
def test_orpo_odds_ratio_term_matches_trl_odds_ratio_loss(lam):
    """TRL returns lambda * log sigma(log odds ratio) and subtracts its mean from the NLL; ours holds the whole
    per-pair loss, so ours - NLL(y_w) must be minus TRL's ``losses``. Rewards are beta * mean log-prob in both."""
    _, ORPOTrainer = trl_experimental()
    pc, pr, nc, nr = random_pairs(seed=2)
    trl_losses, trl_c, trl_r, trl_ratio, trl_log_odds = ORPOTrainer.odds_ratio_loss(stand_in(beta=lam),
                                                                                    pc / nc, pr / nr)
    losses, r_c, r_r = dpo_loss(pc, pr, beta=lam, loss_type="orpo", chosen_num_tokens=nc, rejected_num_tokens=nr)
    assert torch.allclose(losses - chosen_nll(pc, nc), -trl_losses, atol=1e-6, rtol=1e-5)
    assert torch.allclose(r_c, trl_c, atol=1e-6) and torch.allclose(r_r, trl_r, atol=1e-6)
    assert ((pc / nc) > -0.6931).any() and ((pc / nc) < -0.6932).any()  # both branches of log(1 - e^x) ran


def test_per_token_means_match_trl_get_batch_logps(setup):
    """SimPO and ORPO in TRL score each response by get_batch_logps(..., average_log_prob=True): the mean over
    the completion tokens (labels != -100 after the shift). Ours is the summed log-prob over the completion
    tokens divided by completion_mask[:, 1:].sum(1), which must be the same number."""
    CPOTrainer, ORPOTrainer = trl_experimental()
    policy, _, tok, rows, _ = setup
    feats, _ = tokenize_rows(tok, rows)
    batch = collate(feats, tok.pad_token_id)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ours = torch.cat(concatenated_forward(policy, batch)) / batch["completion_mask"][:, 1:].sum(1)
    for trainer in (CPOTrainer, ORPOTrainer):
        theirs = trainer.get_batch_logps(logits, labels, average_log_prob=True)
        assert torch.allclose(ours, theirs, atol=1e-5), trainer.__name__
