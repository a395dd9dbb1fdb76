"""dpo_lib: a small, tested Direct Preference Optimization library for the DPO course.

One module per idea: ``losses`` (the objectives), ``logprobs`` (sequence log-probabilities),
``data`` (schema, chat template, truncation, collation), ``models`` (loading the default
model offline), ``reference`` (the frozen reference and its cache), ``trainer`` (the loop),
``evaluation``, ``plots`` and ``cli`` (``python -m dpo_lib``).
"""

__version__ = "0.1.0"
