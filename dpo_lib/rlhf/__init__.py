"""RLHF, the pipeline DPO replaces, at CPU scale: for lesson 04 and whoever wants to compare DPO with a
reward model + PPO on the same tiny models (DPO itself is in the top-level modules).

* :mod:`~dpo_lib.rlhf.reward_model` — a Bradley–Terry reward model and its loss (Ouyang et al. 2022, Eq. 1);
* :mod:`~dpo_lib.rlhf.ppo` — PPO: rollouts, KL-shaped reward, GAE, clipped losses, value head;
* :mod:`~dpo_lib.rlhf.frozen_trunk` — a frozen trunk shared by every model that trains only its top blocks;
* :mod:`~dpo_lib.rlhf.best_of_n` — best-of-N and evaluation by sampling;
* :mod:`~dpo_lib.rlhf.masks` — the mask and padding helpers they share.
"""

__all__ = []  # import from the modules: one path per name
