"""Graders: the reference passes, every known-wrong variant fails with its own hint."""

import pytest
import torch

from dpo_lib.course import graders as grading
from dpo_lib.course.grading_engine import _close
from dpo_lib.course.graders import GRADERS
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
