import math

import pytest
import torch
from _tiny import tiny, toy_rows

from dpo_lib.config import TrainConfig
from dpo_lib.features import collate, tokenize_rows
from dpo_lib.reference import AdapterDisabledReference, FrozenReference, precompute_reference_logps
from dpo_lib.trainer import DPOTrainer, NonFiniteError, lr_factor


def features(model, tok, n=16):
    f, _ = tokenize_rows(tok, toy_rows(n))
    return precompute_reference_logps(FrozenReference(model), f, tok.pad_token_id)


def config(**kw):
    base = dict(batch_size=4, learning_rate=1e-3, warmup_ratio=0.0, schedule="constant", print_every=0, epochs=1,
                grad_accum=1, sort_by_length=False, compact_lm_head=False, precision="fp32")
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:])) and f[-1] < 0.05
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)


def test_first_step_loss_is_ln2_and_training_learns_the_preference():
    model, tok = tiny()
    feats = features(model, tok)
    trainer = DPOTrainer(model, feats, config(max_steps=24), tok.pad_token_id)
    history = trainer.train(progress=False)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < 0.3
    assert history[-1]["rewards/accuracies"] == 1.0 and history[-1]["rewards/margins"] > 0
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "num_tokens", "tokens_per_second", "learning_rate", "grad_norm"):
        assert key in history[-1]


def test_bf16_autocast_needs_bf16_reference_logps_and_keeps_float32_weights():
    from dpo_lib.precision import autocast, resolve_precision
    model, tok = tiny()
    f, _ = tokenize_rows(tok, toy_rows(16))
    fp32_refs = precompute_reference_logps(FrozenReference(model), f, tok.pad_token_id)
    with autocast("bf16"):
        bf16_refs = precompute_reference_logps(FrozenReference(model), f, tok.pad_token_id)
    gap = max(abs(a["ref_chosen_logps"] - b["ref_chosen_logps"]) for a, b in zip(fp32_refs, bf16_refs))
    assert 1e-4 < gap < 0.02 * max(abs(a["ref_chosen_logps"]) for a in fp32_refs)  # bf16 rounding: small, not 0
    trainer = DPOTrainer(model, bf16_refs, config(max_steps=24, precision="bf16"), tok.pad_token_id)
    history = trainer.train(progress=False)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # same autocast: rewards exactly 0
    assert abs(history[0]["rewards/chosen"]) < 1e-6                    # (other batches than the reference's: ~1e-7)
    assert history[-1]["loss"] < 0.3 and history[-1]["rewards/accuracies"] == 1.0
    assert all(p.dtype == torch.float32 for p in model.parameters())    # master weights stay float32
    assert all(s.dtype == torch.float32 for st in trainer.optimizer.state.values() for s in st.values()
               if torch.is_tensor(s) and s.ndim)
    assert resolve_precision("fp32") == "fp32" and resolve_precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8")  # fp16 is a precision since issue 40 (a loss scaler: dpo_lib.amp)


def test_gradient_accumulation_equals_full_batch():
    results = []
    for accum in (1, 2, 4):
        model, tok = tiny()
        trainer = DPOTrainer(model, features(model, tok, 8), config(max_steps=2, grad_accum=accum), tok.pad_token_id)
        trainer.train(progress=False)
        results.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-6) and torch.allclose(results[0], results[2], atol=1e-6)


def test_frozen_reference_has_no_grad_and_does_not_move():
    model, tok = tiny()
    reference = FrozenReference(model)
    before = [p.clone() for p in reference.model.parameters()]
    f, _ = tokenize_rows(tok, toy_rows(8))
    trainer = DPOTrainer(model, f, config(max_steps=3), tok.pad_token_id, reference=reference)
    history = trainer.train(progress=False)
    assert all(not p.requires_grad for p in reference.model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, reference.model.parameters()))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert history[-1]["loss"] < history[0]["loss"]


def test_precomputed_reference_equals_live_reference():
    torch.manual_seed(0)
    m1, tok = tiny()
    m2, _ = tiny()
    f, _ = tokenize_rows(tok, toy_rows(8))
    live = DPOTrainer(m1, f, config(max_steps=3), tok.pad_token_id, reference=FrozenReference(m1))
    pre = DPOTrainer(m2, features(m2, tok, 8), config(max_steps=3), tok.pad_token_id)
    h1, h2 = live.train(progress=False), pre.train(progress=False)
    assert [h["loss"] for h in h1] == pytest.approx([h["loss"] for h in h2], abs=1e-6)


def test_precompute_batches_by_length_but_keeps_file_order():
    model, tok = tiny()
    f, _ = tokenize_rows(tok, toy_rows(10))
    lengths = [len(x["prompt_ids"]) + max(len(x["chosen_ids"]), len(x["rejected_ids"])) for x in f]
    assert lengths != sorted(lengths)                          # the sort has something to reorder
    seen = []

    def ref(batch):                                            # records each batch's padded width
        seen.append(batch["input_ids"].shape[1])
        return FrozenReference(model)(batch)
    batched = precompute_reference_logps(ref, f, tok.pad_token_id, batch_size=3)
    one_by_one = precompute_reference_logps(FrozenReference(model), f, tok.pad_token_id, batch_size=1)
    assert seen == sorted(seen)                                # batches go shortest first
    for a, b, x in zip(batched, one_by_one, f):
        assert a["chosen_ids"] == x["chosen_ids"]              # same order as the input
        assert a["ref_chosen_logps"] == pytest.approx(b["ref_chosen_logps"], abs=1e-5)
        assert a["ref_rejected_logps"] == pytest.approx(b["ref_rejected_logps"], abs=1e-5)


def test_evaluation_uses_the_reference_batches_so_the_untrained_policy_scores_exactly_zero():
    from dpo_lib.evaluation import implicit_reward_accuracy
    model, tok = tiny()
    f, _ = tokenize_rows(tok, toy_rows(13))
    shapes = {"ref": [], "eval": []}
    seen = shapes["ref"]
    hook = model.register_forward_hook(lambda m, args, kw, out: seen.append(tuple(kw["input_ids"].shape)),
                                       with_kwargs=True)
    reference = FrozenReference(model)          # deep copy: carries the hook too
    with_ref = precompute_reference_logps(reference, f, tok.pad_token_id, batch_size=4)
    seen = shapes["eval"]
    got = implicit_reward_accuracy(model, with_ref, tok.pad_token_id, beta=0.1, batch_size=4)
    hook.remove()
    assert len(shapes["ref"]) == 4 and shapes["ref"] == shapes["eval"]   # same batches, same padding
    assert got["accuracy"] == 0.0 and got["margin"] == 0.0                # every implicit reward is exactly 0


def test_reference_cache_is_reused(tmp_path):
    model, tok = tiny()
    f, _ = tokenize_rows(tok, toy_rows(4))
    first = precompute_reference_logps(FrozenReference(model), f, tok.pad_token_id, cache_dir=tmp_path, model_key="m")

    def boom(batch):
        raise AssertionError("recomputed although cached")
    second = precompute_reference_logps(boom, f, tok.pad_token_id, cache_dir=tmp_path, model_key="m")
    assert [x["ref_chosen_logps"] for x in first] == [x["ref_chosen_logps"] for x in second]


def test_lora_reference_is_the_base_with_adapter_disabled():
    peft = pytest.importorskip("peft")
    model, tok = tiny()
    base_ref = FrozenReference(model)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    f, _ = tokenize_rows(tok, toy_rows(4))
    from dpo_lib.features import collate
    batch = collate(f, tok.pad_token_id)
    ref = AdapterDisabledReference(lora)
    c, r = ref(batch)
    c0, r0 = base_ref(batch)
    assert torch.allclose(c, c0, atol=1e-5) and torch.allclose(r, r0, atol=1e-5)
    from dpo_lib.logprobs import concatenated_forward
    with torch.no_grad():
        cp, _ = concatenated_forward(lora, batch)
    assert not torch.allclose(cp, c0, atol=1e-3)  # the adapter is live for the policy


def test_resume_in_process_gives_identical_weights(tmp_path):
    def trainer(out):
        model, tok = tiny()
        cfg = config(max_steps=6, save_every=2, warmup_ratio=0.3, schedule="cosine")
        return DPOTrainer(model, features(model, tok), cfg, tok.pad_token_id, out_dir=out)

    straight = trainer(tmp_path / "a")
    straight.train(progress=False)
    first = trainer(tmp_path / "b")
    for _ in range(3):
        first.train_step()
    first.save_checkpoint()
    first.train_step()  # progress after the checkpoint is lost, as in a crash
    resumed = trainer(tmp_path / "b")
    resumed.train(resume=True, progress=False)
    assert resumed.history[0]["step"] == 1 and len(resumed.history) == 6
    for p, q in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_non_finite_loss_stops_with_step_and_keeps_checkpoint(tmp_path):
    model, tok = tiny()
    feats = features(model, tok, 8)
    t = DPOTrainer(model, feats, config(max_steps=4, save_every=1), tok.pad_token_id, out_dir=tmp_path)
    t.train_step()
    t.save_checkpoint()
    for f in feats:
        f["ref_chosen_logps"] = float("nan")
    with pytest.raises(NonFiniteError, match=r"step 2: non-finite loss.*step-000001.*learning-rate"):
        t.train_step()
    assert t.latest_checkpoint().name == "step-000001"


def test_a_crash_during_save_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    from dpo_lib import checkpoints as T
    model, tok = tiny()
    t = DPOTrainer(model, features(model, tok, 8), config(max_steps=4), tok.pad_token_id, out_dir=tmp_path)
    t.train_step()
    good = t.save_checkpoint()
    t.train_step()

    def dies_mid_write(m, path):
        open(path, "wb").write(b"partial")
        raise KeyboardInterrupt("killed during save")
    monkeypatch.setattr(T, "save_model", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    assert t.latest_checkpoint() == good
    monkeypatch.undo()
    fresh_model, _ = tiny(seed=3)
    fresh = DPOTrainer(fresh_model, features(model, tok, 8), config(max_steps=4), tok.pad_token_id, out_dir=tmp_path)
    fresh.load_checkpoint(good)  # the last good checkpoint still loads
    assert fresh.step == 1


# ---------------------------------------------------------------- the losses beyond DPO (dpo_lib.losses)

def _never_called(batch):
    raise AssertionError("the reference was called by a reference-free loss")


@pytest.mark.parametrize("loss_type,beta", [("simpo", 2.0), ("orpo", 0.1)])
def test_reference_free_losses_train_and_never_touch_the_reference(loss_type, beta):
    """No reference log-probs in the features, a reference that raises if called: training runs, the loss stays
    finite and falls; rewards are beta * mean log-prob (no log-ratio, so not 0 at step 1)."""
    model, tok = tiny()
    f, _ = tokenize_rows(tok, toy_rows(16))
    assert "ref_chosen_logps" not in f[0]
    trainer = DPOTrainer(model, f, config(max_steps=8, loss_type=loss_type, beta=beta), tok.pad_token_id,
                         reference=_never_called)
    history = trainer.train(progress=False)
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["grad_norm"]) for h in history)
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[0]["rewards/chosen"] < 0 and history[0]["rewards/chosen"] != history[0]["rewards/rejected"]
    assert ("nll" in history[0]) == (loss_type == "orpo")
    assert "ref_chosen_logps" not in trainer.features[0]


def test_reference_free_losses_ignore_precomputed_reference_log_probs():
    """NaN reference log-probs would make any loss that reads them NaN; SimPO's loss is exactly the same as without."""
    model, tok = tiny()
    f, _ = tokenize_rows(tok, toy_rows(8))
    batch = collate(f, tok.pad_token_id)
    trainer = DPOTrainer(model, f, config(loss_type="simpo", beta=2.0), tok.pad_token_id)
    clean, _ = trainer.compute_loss(batch)
    batch["ref_chosen_logps"] = batch["ref_rejected_logps"] = torch.full((8,), float("nan"))
    poisoned, _ = trainer.compute_loss(batch)
    assert torch.equal(clean, poisoned)


def test_losses_with_a_reference_still_refuse_to_start_without_one():
    model, tok = tiny()
    f, _ = tokenize_rows(tok, toy_rows(8))
    for loss_type in ("sigmoid", "dpop", "rdpo"):
        with pytest.raises(ValueError, match="no reference"):
            DPOTrainer(model, f, config(loss_type=loss_type), tok.pad_token_id)


def test_dpop_penalty_reaches_the_trainer_and_training_runs():
    """Reference log-probs set to the policy's own, +1 nat on the chosen side: every pair has
    h = (lp_w - (lp_w + 1)) - 0 = -1 and penalty max(0, 1) = 1, so with beta = 0.1 and lambda = 50 the batch
    loss is softplus(-0.1 * (-1 - 50)) = softplus(5.1) = 5.106...; plain DPO would give softplus(0.1)."""
    model, tok = tiny()
    f = features(model, tok, 8)
    for x in f:
        x["ref_chosen_logps"] += 1.0
    trainer = DPOTrainer(model, f, config(max_steps=3, loss_type="dpop", dpop_lambda=50.0), tok.pad_token_id)
    loss, m = trainer.compute_loss(collate(f, tok.pad_token_id))
    assert loss.item() == pytest.approx(math.log1p(math.exp(5.1)), abs=1e-4)
    assert m["rewards/chosen"] == pytest.approx(-0.1, abs=1e-5)   # DPO's reward, beta * (-1)
    history = DPOTrainer(model, features(model, tok, 8), config(max_steps=3, loss_type="dpop"),
                         tok.pad_token_id).train(progress=False)
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)   # policy = reference: no penalty, h = 0
    assert all(math.isfinite(h["loss"]) for h in history)


def test_rdpo_length_term_uses_the_completion_token_counts():
    """Policy = reference (h = 0): the R-DPO loss is the mean of softplus(-alpha * (|y_w| - |y_l|)) with |y| the
    number of response tokens; the toy chosen answers are longer ('yes' + 1-3 words vs 'no' + 1), so with
    alpha = 0.5 it is well below ln 2."""
    model, tok = tiny()
    f = features(model, tok, 8)
    gaps = torch.tensor([len(x["chosen_ids"]) - len(x["rejected_ids"]) for x in f], dtype=torch.float32)
    assert (gaps > 0).any()
    trainer = DPOTrainer(model, f, config(max_steps=3, loss_type="rdpo", rdpo_alpha=0.5), tok.pad_token_id)
    loss, _ = trainer.compute_loss(collate(f, tok.pad_token_id))
    expected = torch.nn.functional.softplus(-0.5 * gaps).mean().item()
    assert loss.item() == pytest.approx(expected, abs=1e-5) and expected < math.log(2) - 0.1
    history = trainer.train(progress=False)
    assert all(math.isfinite(h["loss"]) for h in history) and history[-1]["loss"] < history[0]["loss"]


def test_job_skips_the_training_reference_log_probs_for_reference_free_losses(tmp_path):
    """The main job computes reference log-probs for the training pairs only when the loss reads them; the held-out
    ones are always computed (the evaluation's implicit-reward accuracy and KL are measured against the reference)."""
    from _tiny import save_tiny, write_jsonl

    from dpo_lib.config import JobConfig
    from dpo_lib.recipes.train import prepare
    folder = save_tiny(tmp_path / "tiny")
    train, test = write_jsonl(tmp_path / "train.jsonl", toy_rows(8)), write_jsonl(tmp_path / "test.jsonl", toy_rows(4))
    job = JobConfig(model=str(folder), dataset=train, eval_dataset=test, out=tmp_path / "out")
    for loss_type, train_has_ref in (("simpo", False), ("orpo", False), ("dpop", True)):
        s, train_features, _ = prepare(job, config(loss_type=loss_type), tmp_path / f"out-{loss_type}")
        assert ("ref_chosen_logps" in train_features[0]) == train_has_ref, loss_type
        assert "ref_chosen_logps" in s.eval_features[0], loss_type
