"""The course's own machinery: what the lessons and exercises use, not what a practitioner imports.

* :mod:`~dpo_lib.course.bandit` — the preference bandit of lesson 01 (every quantity in closed form);
* :mod:`~dpo_lib.course.mask_view` — the token-mask view of lesson 02;
* :mod:`~dpo_lib.course.failures` — lesson 06's data surgery (minimal pairs, CHES, label flips);
* :mod:`~dpo_lib.course.profiles` — the lessons' run profiles (``smoke``, ``laptop``, ``gpu``) and their settings;
* :mod:`~dpo_lib.course.graders` — the ``check_*`` functions of the exercise notebooks (those of lessons
  02–03 live in :mod:`~dpo_lib.course.graders_lm`, of 04 in :mod:`~dpo_lib.course.graders_rlhf`, of 05 in
  :mod:`~dpo_lib.course.graders_gpu`, of 06 in :mod:`~dpo_lib.course.graders_variants`, of 07 in
  :mod:`~dpo_lib.course.graders_iterate`),
  built on :mod:`~dpo_lib.course.grading_engine`;
* :mod:`~dpo_lib.course.exercises` — generates ``exercises/`` from ``solutions/``;
* :mod:`~dpo_lib.course.colab` — the notebooks' Colab install cell and badges (``python -m dpo_lib colab``).
"""

__all__ = []  # import from the modules: one path per name
