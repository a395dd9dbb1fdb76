"""How a grader's verdict reaches the learner: the hint alone, no library frames (in a Jupyter kernel, hence in
JupyterLab and under nbval), numpy numbers accepted, and hints that name the mistake actually made."""

from __future__ import annotations

import nbformat
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpo_lib.course.graders import check_optimal_policy
from dpo_lib.course.graders_iterate import check_best_vs_worst, reference_best_vs_worst
from dpo_lib.course.graders_rlhf import check_reward_model_loss
from dpo_lib.course.grading_engine import GradingError

WRONG = """import torch
from dpo_lib.course.graders import check_optimal_policy
def optimal_policy(ref_probs, rewards, beta):
    return torch.softmax(torch.log(ref_probs) + rewards * beta, dim=-1)  # β multiplies: wrong
check_optimal_policy(optimal_policy)"""


@pytest.mark.notebook
def test_a_kernel_shows_the_hint_and_no_library_frames(execute_notebook, tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(WRONG)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    import nbclient

    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", allow_errors=True,
                                     resources={"metadata": {"path": str(tmp_path)}})
    (error,) = client.execute().cells[0].outputs
    shown = "\n".join(error["traceback"])
    assert error["ename"] == "GradingError"
    assert shown.splitlines()[0].endswith("✗ optimal_policy: 6/6 cases differ from the reference.\x1b[0m")
    assert "Likely mistake: divide the reward by β" in shown
    assert not any(word in shown for word in ("Traceback", "grading_engine", "graders.py", "File ")), shown


def test_a_pass_line_is_unchanged_and_a_failure_is_still_an_assertion_error(capsys):
    check_optimal_policy(lambda p, r, b: torch.softmax(torch.log(p) + r / b, dim=-1))
    assert capsys.readouterr().out == "✓ optimal_policy: 6/6 cases match\n"
    with pytest.raises(AssertionError) as err:
        check_optimal_policy(lambda p, r, b: torch.softmax(torch.log(p) + r * b, dim=-1))
    assert isinstance(err.value, GradingError) and err.value._render_traceback_()[1].startswith("  Likely mistake")


def test_numpy_scalars_count_as_numbers(capsys):
    def accuracy_as_numpy(c, r):
        return -F.logsigmoid(c - r).mean(), np.float32((c > r).float().mean().item())

    check_reward_model_loss(accuracy_as_numpy)
    assert "✓ reward_model_loss" in capsys.readouterr().out


def test_log1p_exp_is_named_as_an_overflow_not_as_log_sigmoid():
    with pytest.raises(GradingError, match=r"log1p\(torch.exp\(-z\)\) is inf"):
        check_reward_model_loss(lambda c, r: (torch.log1p(torch.exp(-(c - r))).mean(), (c > r).float().mean()))


def _best_score_alone(prompt_rows, samples, scores, min_gap):
    rows = []
    for i, row in enumerate(prompt_rows):
        scored = sorted((x, s["text"]) for s, x in zip(samples, scores) if s["prompt_index"] == i)
        (_, worst), (hi, best) = scored[0], scored[-1]
        if hi >= min_gap and best != worst:
            rows.append({"prompt": row["prompt"], "chosen": best, "rejected": worst})
    return rows


def test_comparing_the_best_score_alone_with_min_gap_gets_its_own_hint():
    check_best_vs_worst(reference_best_vs_worst)
    with pytest.raises(GradingError) as err:
        check_best_vs_worst(_best_score_alone)
    assert "not the best score alone" in str(err.value) and "minimum gap is missing" not in str(err.value)
