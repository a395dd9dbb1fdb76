"""dpo_lib: a small, tested Direct Preference Optimization library for the DPO course.

The DPO core is flat at the top: ``losses`` (the objectives and their registry), ``logprobs``
(sequence log-probabilities), ``data`` (reading and validating preference files), ``features``
(tokenized pairs, the chat template, batches), ``hub_datasets`` (hub datasets into the course
schema), ``models`` (the embedded default model), ``precision``, ``reference`` (the frozen
reference and its cache), ``settings`` and ``config`` (every setting, its default and its check),
``trainer`` (the step loop) with ``distributed``, ``checkpoints`` and ``logger``, ``sampling``,
``evaluation``, ``rewards``, ``capability`` (the alignment tax), ``lora``, ``plots`` and ``cli``
(``python -m dpo_lib``).

Whole runs are recipes (``dpo_lib.recipes``: the main job ``train`` and ``iterate``, on the run
layer ``run``). The other readers' code is in subpackages: ``dpo_lib.rlhf`` (the reward model and
PPO of lesson 04), ``dpo_lib.course`` (the bandit, the token-mask view, the graders and the exercise
generator) and ``dpo_lib.tools`` (the TRL bench, FLOPs, memory, the VRAM planner, the run doctor).

Each module lists its public names in ``__all__``, and each name has one home. The names below are
the most used ones, each from its home module; they are imported on first use, so
``python -m dpo_lib`` checks its flags before torch is loaded.
"""

__version__ = "0.1.0"

# home module -> the names dpo_lib re-exports from its __all__ (tests/test_api.py checks both)
_FROM = {
    "losses": ("dpo_loss", "LOSS_TYPES", "LOSSES"),
    "logprobs": ("sequence_logprobs", "concatenated_forward"),
    "data": ("load_preferences", "DataError"),
    "features": ("tokenize_rows", "collate"),
    "models": ("load_model", "load_tokenizer"),
    "config": ("TrainConfig", "JobConfig"),
    "trainer": ("DPOTrainer",),
    "reference": ("FrozenReference", "AdapterDisabledReference", "precompute_reference_logps"),
    "evaluation": ("implicit_reward_accuracy",),
    "sampling": ("generate",),
}
_EXPORTS = {name: module for module, names in _FROM.items() for name in names}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"dpo_lib.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dpo_lib' has no attribute {name!r}")
