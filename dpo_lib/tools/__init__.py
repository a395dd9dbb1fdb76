"""Tools around training: measuring and planning, not training itself.

* :mod:`~dpo_lib.tools.bench` — ``python -m dpo_lib bench --vs trl`` (its worker: ``python -m dpo_lib.tools.bench``);
* :mod:`~dpo_lib.tools.flops` — FLOPs of a DPO step and MFU;
* :mod:`~dpo_lib.tools.memory` — parameter sizes, resident and peak memory, saved activations;
* :mod:`~dpo_lib.tools.vram` — the VRAM planner, with the model and GPU tables of :mod:`~dpo_lib.tools.specs`.
"""
