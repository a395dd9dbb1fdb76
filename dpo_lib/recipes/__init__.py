"""Recipes: whole runs built on the DPO core, each a command of ``python -m dpo_lib``.

:mod:`~dpo_lib.recipes.run` is the run layer both recipes stand on: the output folder (one live
run per folder, the run card and its comparison on resume, atomic writes), the model, tokenizer,
frozen reference and held-out set-up, and the evaluation before and after training.
:mod:`~dpo_lib.recipes.train` is the main job (``python -m dpo_lib train``);
:mod:`~dpo_lib.recipes.iterate` iterative on-policy DPO (``python -m dpo_lib iterate``).
"""

__all__: list[str] = []
