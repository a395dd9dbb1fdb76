"""RLHF, the pipeline DPO replaces (lesson 04), at CPU scale.

* :mod:`~dpo_lib.rlhf.reward_model` — a Bradley–Terry reward model and its loss (Ouyang et al. 2022, Eq. 1);
* :mod:`~dpo_lib.rlhf.ppo` — PPO: rollouts, KL-shaped reward, GAE, clipped losses, value head;
* :mod:`~dpo_lib.rlhf.frozen_trunk` — a frozen trunk shared by every model that trains only its top blocks;
* :mod:`~dpo_lib.rlhf.best_of_n` — best-of-N and evaluation by sampling;
* :mod:`~dpo_lib.rlhf.masks` — the mask and padding helpers they share.
"""
