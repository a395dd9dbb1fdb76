"""dpo_lib: a small, tested Direct Preference Optimization library for the DPO course.

The DPO core is flat at the top: ``losses`` (the objectives), ``logprobs`` (sequence
log-probabilities), ``data`` (schema, chat template, truncation, collation), ``hub_datasets``
(hub datasets into that schema), ``models`` (the embedded default model), ``precision``,
``reference`` (the frozen reference and its cache), ``config`` (every setting and its default),
``trainer`` (the step loop) with ``checkpoints`` and ``logger``, ``sampling``, ``evaluation``,
``rewards``, ``lora``, ``plots``, ``job`` (the main job) and ``cli`` (``python -m dpo_lib``).

The other readers' code is in subpackages: ``dpo_lib.rlhf`` (the reward model and PPO of
lesson 04), ``dpo_lib.course`` (the bandit, the token-mask view, the graders and the exercise
generator) and ``dpo_lib.tools`` (the TRL bench, FLOPs, memory, the VRAM planner).

The names below are imported on first use, so ``python -m dpo_lib`` checks its flags before
torch is loaded.
"""

__version__ = "0.1.0"

_EXPORTS = {
    "dpo_loss": "losses", "LOSS_TYPES": "losses",
    "sequence_logprobs": "logprobs", "concatenated_forward": "logprobs",
    "load_preferences": "data", "tokenize_rows": "data", "collate": "data", "DataError": "data",
    "load_model": "models", "load_tokenizer": "models",
    "TrainConfig": "config", "JobConfig": "config",
    "DPOTrainer": "trainer",
    "FrozenReference": "reference", "AdapterDisabledReference": "reference",
    "precompute_reference_logps": "reference",
    "implicit_reward_accuracy": "evaluation",
    "generate": "sampling",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"dpo_lib.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'dpo_lib' has no attribute {name!r}")
