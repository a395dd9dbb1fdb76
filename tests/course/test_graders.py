"""Graders: the reference passes, every known-wrong variant fails with its own hint."""

import pytest
import torch

from dpo_lib.course import graders as grading
from dpo_lib.course.graders import GRADERS
from dpo_lib.course.grading_engine import _close
from dpo_lib.evaluation import mean_and_se
from dpo_lib.logprobs import concatenated_forward

MISTAKES = [(name, i) for name, grader in GRADERS.items() for i in range(len(grader.mistakes))]


@pytest.mark.parametrize("name", list(GRADERS))
def test_reference_passes_with_one_line(name, capsys):
    getattr(grading, f"check_{name}")(GRADERS[name].reference)
    assert capsys.readouterr().out == f"✓ {name}: 6/6 cases match\n"


@pytest.mark.parametrize("name,i", MISTAKES, ids=[f"{n}-{i}" for n, i in MISTAKES])
def test_known_mistake_is_named(name, i, capsys):
    grader = GRADERS[name]
    mistake = grader.mistakes[i]
    with pytest.raises(AssertionError) as err:
        grader(mistake.fn)
    assert mistake.hint in str(err.value)
    assert str(err.value).startswith(f"✗ {name}:")
    assert capsys.readouterr().out == ""


def _dpo_parts(pc, pr, rc, rr, beta):
    return grading.reference_dpo_loss(pc, pr, rc, rr, beta)


def test_dpo_rewards_must_be_detached():
    def attached(pc, pr, rc, rr, beta):
        losses, _, _ = _dpo_parts(pc, pr, rc, rr, beta)
        return losses, beta * (pc - rc), beta * (pr - rr)

    with pytest.raises(AssertionError, match="detached"):
        grading.check_dpo_loss(attached)


def test_dpo_loss_must_stay_in_graph():
    def cut(*args):
        losses, c, r = _dpo_parts(*args)
        return losses.detach(), c, r

    with pytest.raises(AssertionError, match="autograd graph"):
        grading.check_dpo_loss(cut)


def test_two_mistakes_give_two_hints():
    def both(pc, pr, rc, rr, beta):  # loss without beta and rewards without beta
        h = (pc - rc) - (pr - rr)
        return -torch.nn.functional.logsigmoid(h), (pc - rc).detach(), (pr - rr).detach()

    with pytest.raises(AssertionError) as err:
        grading.check_dpo_loss(both)
    assert "β is missing" in str(err.value) and "rewards are missing β" in str(err.value)


def test_unknown_mistake_shows_a_failing_case():
    with pytest.raises(AssertionError) as err:
        grading.check_optimal_policy(lambda ref, r, beta: torch.ones_like(ref) / len(ref))
    message = str(err.value)
    assert "probs differs on case" in message and "expected" in message and "got" in message


def test_wrong_return_structure():
    with pytest.raises(AssertionError, match="return a tuple"):
        grading.check_dpo_loss(lambda *a: _dpo_parts(*a)[0])
    with pytest.raises(AssertionError, match="forget `return`"):
        grading.check_ipo_loss(lambda *a: None)


def test_todo_propagates():
    def todo(*args):
        raise NotImplementedError("TODO: write it")

    with pytest.raises(NotImplementedError):
        grading.check_sequence_logprobs(todo)


def test_scalar_as_tensor_and_in_place_edits_are_fine(capsys):
    grading.check_reward_accuracy(lambda c, r: (c > r).float().mean())  # a 0-d tensor is fine

    def in_place(attention_mask, prompt_lengths):
        out = grading.reference_completion_mask(attention_mask, prompt_lengths)
        attention_mask.zero_()  # must not affect the reference's inputs
        return out

    grading.check_completion_mask(in_place)
    assert capsys.readouterr().out.count("✓") == 2


def test_a_mask_one_position_early_is_named():
    """Lesson 02's off-by-one mask: lined up with the labels, then shifted again by sequence_logprobs."""
    def early(attention_mask, prompt_lengths):
        mask = grading.reference_completion_mask(attention_mask, prompt_lengths)
        return torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)

    with pytest.raises(AssertionError, match="one position early"):
        grading.check_completion_mask(early)


def test_mistakes_really_differ_from_reference():
    """A variant that equals the reference on every case could never be detected."""
    for name, grader in GRADERS.items():
        g = torch.Generator().manual_seed(grader.seed)
        cases = [grader.make_case(g, k) for k in range(grader.n_cases)]
        for m in grader.mistakes:
            outs = [(grader._outputs(m.fn, a), grader._outputs(grader.reference, a)) for a in cases]
            assert not all(_close(x, y, grader.rtol, grader.atol)
                           for o, ref in outs for x, y in zip(o, ref)), (name, m.hint)


# ------------------------------------------------------------------ lessons 02 and 03 (harness graders)

def test_split_accepts_batch_encodings_and_tensors(capsys):
    def as_encodings(tok, prompt, response):
        p = tok.apply_chat_template(prompt, add_generation_prompt=True)  # a BatchEncoding in transformers 5
        full = tok.apply_chat_template(prompt + response, return_tensors="pt")["input_ids"]  # [1, T]
        return p, full[0, len(p["input_ids"]):]

    grading.check_split_prompt_completion(as_encodings)
    assert capsys.readouterr().out == "✓ split_prompt_completion: 6/6 cases match\n"
    with pytest.raises(AssertionError, match="list of token ids"):
        grading.check_split_prompt_completion(lambda tok, p, r: ("text", [1]))
    with pytest.raises(AssertionError, match="return a tuple"):
        grading.check_split_prompt_completion(lambda tok, p, r: [1, 2, 3])


def test_reference_detached_after_the_fact_is_flagged():
    def detached(ref_model, batch):  # right values, but autograd ran during the forward
        chosen, rejected = concatenated_forward(ref_model, batch)
        return chosen.detach(), rejected.detach()

    with pytest.raises(AssertionError, match="torch.no_grad"):
        grading.check_reference_logps(detached)


def test_train_step_flags_reference_grads_and_bad_returns():
    def two_forwards(policy, ref_model, optimizer, batch, beta):  # correct, written differently
        B = batch["input_ids"].shape[0] // 2
        logps = grading.sequence_logprobs(policy(input_ids=batch["input_ids"],
                                                 attention_mask=batch["attention_mask"]).logits,
                                          batch["input_ids"], batch["completion_mask"])
        with torch.no_grad():
            ref = grading.reference_reference_logps(ref_model, batch)
        losses, _, _ = grading.dpo_loss(logps[:B], logps[B:], *ref, beta=beta)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        return losses.mean()  # a 0-d tensor is fine

    grading.check_dpo_train_step(two_forwards)
    with pytest.raises(AssertionError, match="forget `return`"):
        grading.check_dpo_train_step(lambda *a: None)
    with pytest.raises(AssertionError, match="return the loss"):
        grading.check_dpo_train_step(lambda *a: (grading.reference_dpo_train_step(*a), {}))


def test_harness_graders_leave_the_learner_state_alone(capsys):
    torch.set_num_threads(2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    grading.check_dpo_train_step(grading.reference_dpo_train_step)
    grading.check_concatenated_logps(grading.reference_concatenated_logps)
    assert torch.equal(torch.rand(3), expected)  # the global RNG was not reseeded by the tiny models
    assert torch.get_num_threads() == 2
    assert capsys.readouterr().out.count("✓") == 2


def test_every_required_mistake_is_covered():
    """The course promises hints for these mistakes (COURSE.md, Exercises)."""
    hints = " ".join(m.hint for g in GRADERS.values() for m in g.mistakes)
    for phrase in ["β is missing", "mean instead of sum", "not shifted", "prompt is not masked", "torch.no_grad",
                   "duplicated BOS", "end-of-turn token"]:
        assert phrase in hints, phrase


# ------------------------------------------------------------------ gradients, numerics, messages (issue 16)

def test_a_detached_chosen_term_fails_on_its_gradient():
    def chosen_detached(pc, pr, rc, rr, beta):  # right values, no gradient for the chosen reply
        chosen, rejected = pc.detach() - rc, pr - rr
        losses = -torch.nn.functional.logsigmoid(beta * (chosen - rejected))
        return losses, beta * chosen.detach(), beta * rejected.detach()

    with pytest.raises(AssertionError) as err:
        grading.check_dpo_loss(chosen_detached)
    message = str(err.value)
    assert "chosen log-ratio is detached" in message and "∂losses/∂policy_chosen_logps" in message
    assert "cut from the autograd graph" not in message  # the better explanation wins
    assert "rejected log-ratio" not in message


def test_concatenated_logps_under_no_grad_fails_in_its_own_check():
    def under_no_grad(model, batch):
        with torch.no_grad():
            return grading.reference_concatenated_logps(model, batch)

    with pytest.raises(AssertionError) as err:  # an AssertionError with a hint, not a RuntimeError later
        grading.check_concatenated_logps(under_no_grad)
    assert "carry no gradient" in str(err.value) and "torch.no_grad()" in str(err.value)


def test_naive_optimal_policy_overflows_and_the_hint_says_log_space():
    def naive(ref, rewards, beta):
        w = ref * torch.exp(rewards / beta)
        return w / w.sum()

    with pytest.raises(AssertionError) as err:
        grading.check_optimal_policy(naive)
    assert "1/6 cases differ" in str(err.value) and "log space" in str(err.value)
    g = torch.Generator().manual_seed(0)
    ref, rewards, beta = [grading.GRADERS["optimal_policy"].make_case(g, k) for k in range(6)][-1]
    assert beta == 0.01 and rewards.dtype == torch.float32 and torch.isnan(naive(ref, rewards, beta)).any()


def _full_log_softmax_logps(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    token = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)


def test_train_step_with_a_full_log_softmax_passes(capsys):
    """Issue 16: case 4 used to blow the weights up (|w| ≈ 190) and failed this correct answer."""
    def step(policy, ref_model, optimizer, batch, beta):
        chosen, rejected = _full_log_softmax_logps(policy, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = _full_log_softmax_logps(ref_model, batch)
        losses, _, _ = grading.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta)
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        return losses.mean().item()

    grading.check_dpo_train_step(step)
    assert capsys.readouterr().out == "✓ dpo_train_step: 6/6 cases match\n"


def test_a_difference_in_a_large_tensor_says_where_and_by_how_much():
    grader = grading.Grader("big", lambda x: x * 2, lambda g, k: (torch.randn(500, generator=g),), ("x",))

    def off_at_7(x):
        y = x * 2
        y[7] += 1e-3
        return y

    with pytest.raises(AssertionError) as err:
        grader(off_at_7)
    message = str(err.value)
    assert "largest difference 0.001 at index 7" in message and "1 of 500 entries" in message
    assert "expected a tensor of shape [500]" not in message


def test_a_nan_says_where_it_is():
    grader = grading.Grader("nan", lambda x: x + 1, lambda g, k: (torch.randn(3, 4, generator=g),), ("x",))
    with pytest.raises(AssertionError, match=r"got nan at index \(1, 2\)"):
        grader(lambda x: torch.where(torch.arange(12).reshape(3, 4) == 6, torch.nan, x + 1))


def test_rlhf_answers_written_differently_pass(capsys):
    def gae_by_matrix(rewards, values, gamma, lam, mask):  # the sum over the future as a matrix product
        r, v = rewards * mask, values * mask
        T = r.shape[1]
        next_v = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], 1)
        delta = r + gamma * next_v - v
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        decay = torch.where(j >= i, (gamma * lam) ** (j - i).clamp(min=0).double(), 0.0).to(r.dtype)
        adv = delta @ decay.T
        return adv, adv + v

    def ppo_as_max(logprobs, old, adv, mask, eps):
        ratio = (logprobs - old).exp()
        loss = torch.maximum(-adv * ratio, -adv * torch.clip(ratio, 1 - eps, 1 + eps))
        return loss[mask.bool()].mean()

    grading.check_gae(gae_by_matrix)
    grading.check_ppo_policy_loss(ppo_as_max)
    grading.check_win_rate(lambda p, r: mean_and_se([(a > b) + 0.5 * (a == b) for a, b in zip(p, r)]))
    assert capsys.readouterr().out.count("✓") == 3


def test_memory_bill_reference_matches_the_planner_formulas():
    from dpo_lib.tools.vram import lora_trainable_params, model_spec

    spec = model_spec("SmolLM2-135M-Instruct")
    P, n = spec.params, lora_trainable_params(spec, 16)
    assert grading.reference_memory_bill(spec, "full", "bf16", 16) == (2 * P, 2 * P, 12 * P)
    assert grading.reference_memory_bill(spec, "full", "fp32", 16) == (4 * P, 4 * P, 8 * P)
    assert grading.reference_memory_bill(spec, "lora", "bf16", 16) == (2 * P + 4 * n, 4 * n, 8 * n)


def test_issue_16_mistakes_are_covered():
    hints = " ".join(m.hint for g in GRADERS.values() for m in g.mistakes)
    for phrase in ["λ and γ are swapped", "value after the last step must be 0", "not reversed in time",
                   "min and max are swapped", "advantage is clipped", "ties count as losses", "log space",
                   "chosen log-ratio is detached", "carry no gradient", "F.logsigmoid"]:
        assert phrase in hints, phrase
    lesson_04_05 = {"reward_model_loss", "kl_shaped_rewards", "gae", "ppo_policy_loss", "best_of_n_kl",
                    "lora_parameters", "memory_bill", "win_rate", "sequence_kl"}
    assert lesson_04_05 <= set(GRADERS)
