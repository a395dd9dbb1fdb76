"""Tools around training, for whoever sizes or measures a run (lesson 05, ``python -m dpo_lib bench``):
measuring and planning, not training itself.

* :mod:`~dpo_lib.tools.bench` — ``python -m dpo_lib bench --vs trl`` (its worker: ``python -m dpo_lib.tools.bench``);
* :mod:`~dpo_lib.tools.memory` — parameter sizes, resident and peak memory, saved activations;
* :mod:`~dpo_lib.tools.specs` — model shapes and the GPU table (memory, bf16, peak FLOP/s), shared by the two below;
* :mod:`~dpo_lib.tools.vram` — the VRAM planner;
* :mod:`~dpo_lib.tools.flops` — FLOPs of a DPO step and MFU.
"""

__all__ = []  # import from the modules: one path per name
