"""A reward-model judge for tasks without a ground-truth reward (UltraFeedback in lesson 05's ``gpu`` profile).

The sentiment task has a true reward (VADER, :mod:`dpo_lib.rewards`); a real preference dataset has none,
so the policy's samples are scored by a *reward model*: a sequence classifier trained on human
preferences that maps (prompt, answer) to one number. The win rate of the policy against the
reference (ties ½, :func:`dpo_lib.evaluation.win_rate`) is then measured the same way, with its SE —
against that reward model's taste, which a policy can exploit like any proxy (lesson 04).

* :class:`RewardModelJudge` — ``judge(prompts, answers) -> list[float]`` with any
  ``AutoModelForSequenceClassification`` (one logit); a chat template formats the pair when the
  tokenizer has one, else the (question, answer) pair encoding of encoder models.
* :data:`DEFAULT_REWARD_MODEL` — the hub model lesson 05 loads online (:meth:`RewardModelJudge.from_hub`).
* :func:`score_samples` — the judge's scores of :func:`dpo_lib.sampling.generate`'s samples.
* :func:`tiny_judge` — a random tiny stand-in with the course's tiny tokenizer, for the tests.
"""

from __future__ import annotations

import torch

__all__ = ["DEFAULT_REWARD_MODEL", "RewardModelJudge", "score_samples", "tiny_judge"]

# a DeBERTa-v3-large reward model (435M parameters) trained on human preference data (WebGPT, summarize
# from feedback, synthetic-instruct, anthropic_hh); takes (question, answer) pairs; one logit
DEFAULT_REWARD_MODEL = "OpenAssistant/reward-model-deberta-v3-large-v2"


def _prompt_messages(prompt) -> list[dict]:
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def _prompt_text(prompt) -> str:
    return prompt[-1]["content"] if isinstance(prompt, list) else prompt


class RewardModelJudge:
    """Scores (prompt, answer) pairs with a sequence-classification reward model, ``batch_size`` at a time,
    under ``no_grad``; prompts are strings or conversational message lists."""

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 1024):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        self.device = next(model.parameters()).device
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    @classmethod
    def from_hub(cls, name: str = DEFAULT_REWARD_MODEL, device: str | None = None,
                 dtype: torch.dtype | None = None, **kwargs) -> RewardModelJudge:
        """Download ``name`` (online only) onto ``device`` (default: CUDA if there is one)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).to(device)
        return cls(model, AutoTokenizer.from_pretrained(name), **kwargs)

    def _encode(self, prompts, answers) -> dict:
        tok, kw = self.tokenizer, dict(padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        if self.chat:
            texts = [tok.apply_chat_template(_prompt_messages(p) + [{"role": "assistant", "content": a}],
                                             tokenize=False) for p, a in zip(prompts, answers)]
            return tok(texts, add_special_tokens=False, **kw)
        return tok([_prompt_text(p) for p in prompts], list(answers), **kw)

    @torch.no_grad()
    def __call__(self, prompts, answers) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts for {len(answers)} answers")
        scores: list[float] = []
        for i in range(0, len(answers), self.batch_size):
            batch = self._encode(prompts[i:i + self.batch_size], answers[i:i + self.batch_size])
            logits = self.model(**{k: v.to(self.device) for k, v in batch.items()}).logits
            scores += logits[:, 0].float().cpu().tolist()
        return scores


def score_samples(judge, prompts: list, samples: list[dict]) -> list[float]:
    """``judge``'s score of each sample of :func:`dpo_lib.sampling.generate` (``prompt_index`` into ``prompts``)."""
    return judge([prompts[s["prompt_index"]] for s in samples], [s["text"] for s in samples])


def tiny_judge(seed: int = 0) -> RewardModelJudge:
    """A random two-layer Llama reward model on the course's tiny tokenizer: the tests' offline stand-in for
    :data:`DEFAULT_REWARD_MODEL` (its scores mean nothing; the code path is the real one)."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from dpo_lib.models import tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id)
    return RewardModelJudge(LlamaForSequenceClassification(config), tok)
