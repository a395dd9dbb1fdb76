"""One plotting style, readable where JupyterLab shows a figure (~950 px wide): no text under 9 px."""

import matplotlib.pyplot as plt

from dpo_lib import plots


def _history():
    return [{"step": s, "epoch": s / 4, "loss": 0.69 - 0.01 * s, "rewards/accuracies": 0.5, "rewards/margins": 0.1 * s,
             "rewards/chosen": -0.05 * s, "rewards/rejected": -0.1 * s,
             **({"eval/accuracy": 0.6, "eval/margin": 0.2} if s % 4 == 0 else {})} for s in range(1, 13)]


def test_the_curves_and_each_panel_are_readable_at_jupyterlabs_width():
    fig = plots.plot_curves(_history(), beta=0.1)
    assert fig.get_size_inches()[0] * fig.dpi <= plots.SHOWN_WIDTH_PX  # shown at its own size, not scaled down
    assert plots.smallest_text_px(fig) >= plots.MIN_TEXT_PX
    for panel in plots.plot_training(_history(), beta=0.1).values():
        assert plots.smallest_text_px(panel) >= plots.MIN_TEXT_PX


def test_the_measure_sees_what_the_old_curves_did_wrong():
    """The former 16-inch figure with 7-pt legends: shown at 950 px its legend text was under 6 px."""
    fig, ax = plt.subplots(figsize=(16, 3.8), dpi=100)
    ax.plot([0, 1], label="loss")
    ax.legend(fontsize=7)
    assert plots.smallest_text_px(fig) < 6
    plt.close(fig)


def test_the_course_style_is_applied_on_import():
    plots.use_course_style()
    assert plt.rcParams["legend.fontsize"] * 100 / 72 >= plots.MIN_TEXT_PX
