"""The alignment tax: what preference training costs the model's other abilities, measured offline.

Two small checks, run on the same examples before and after training and compared per example
(:func:`paired_change`), so the change comes with a paired standard error:

* :func:`general_nll` — the mean per-token negative log-likelihood (nats) of held-out general text
  that the sentiment task never trains on: the course's paragraphs (``data/general/general_text.jsonl``,
  scored as plain text, every token after the first) and the assistant set's held-out replies
  (``data/assistant/test.jsonl``, the ``chosen`` reply given its prompt through the chat template,
  scored as the trainer scores a reply: with the template's end-of-turn token and newline). One
  number per text; a rise after training means the model finds ordinary text less likely.
* :func:`instruction_following` — whether the model's answer to each prompt of
  ``data/general/instructions.jsonl`` follows its verifiable instruction ("answer in lowercase",
  "exactly three bullet points", "fewer than 10 words", ...), judged by the plain Python verifiers
  of :data:`VERIFIERS`. Decoding is greedy (deterministic, so before and after differ only by the
  weights, and one answer per prompt suffices). An answer that has not ended (no EOS) within
  ``max_new_tokens`` counts as a failure whatever its text: the verifiers only judge answers the
  model finished, so a cut answer never passes "end with a question" or "fewer than N words" by
  accident.

:func:`measure` runs both (the main job calls it before and after training); :func:`paired_change`
turns two of its results into ``general_nll_before``, ``general_nll_after``, ``general_nll_change``,
``general_nll_change_se`` and the same four for ``instruction_following`` (changes are after minus
before, SEs over examples of the paired differences). On the embedded model one :func:`measure`
call takes about 25-30 s on 2 CPU cores (see ``data/README.md``, "Capability checks").
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from dpo_lib.data import load_preferences, load_prompts
from dpo_lib.evaluation import mean_and_se
from dpo_lib.features import batch_to, collate_sequences, tokenize_pair
from dpo_lib.logprobs import sequence_logprobs
from dpo_lib.sampling import generate
from dpo_lib.stats import gain

__all__ = [
    "GENERAL_TEXT", "INSTRUCTIONS", "HELDOUT_REPLIES", "MEASURES", "MAX_NEW_TOKENS", "BATCH_SIZE", "VERIFIERS",
    "is_lowercase", "is_uppercase", "has_bullets", "fewer_words", "includes_word", "excludes_word",
    "ends_with_question", "has_no_commas", "starts_with_word", "has_sentences", "is_quoted", "is_digits_only",
    "count_bullets", "count_sentences", "load_general_texts", "load_instructions",
    "general_nll", "instruction_following", "measure", "paired_change",
]

DATA = Path(__file__).resolve().parent.parent / "data"
GENERAL_TEXT = DATA / "general" / "general_text.jsonl"
INSTRUCTIONS = DATA / "general" / "instructions.jsonl"
HELDOUT_REPLIES = DATA / "assistant" / "test.jsonl"
MEASURES = ("general_nll", "instruction_following")
MAX_NEW_TOKENS = 64   # greedy; chosen with the timing in data/README.md ("Capability checks")
BATCH_SIZE = 16       # rows per forward for the NLL (the instructions are sampled in one batch)


# ----------------------------------------------------------------------------- verifiers
# Each takes the answer text (and the instruction's arguments) and returns True when the answer
# follows the instruction. An empty answer follows none of them.

_BULLET = re.compile(r"^\s*[-*•]\s+\S")                  # "- item", "* item", "• item" (not "1." lists)
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)]*\s+|\n+")  # after . ! ? (and closing quotes), or a line break
_CLOSERS = "\"'”’)]*_ \t\n"                                # trailing quotes, brackets, markdown
_PUNCTUATION = "\"'“”‘’()[]*_.,:;!?-"                     # stripped from both ends of a first word


def _has_letters(text: str) -> bool:
    return any(c.isalpha() for c in text)


def _word_pattern(word: str) -> re.Pattern:
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)


def is_lowercase(text: str) -> bool:
    """Letters, and none of them upper-case."""
    return _has_letters(text) and text == text.lower()


def is_uppercase(text: str) -> bool:
    """Letters, and none of them lower-case."""
    return _has_letters(text) and text == text.upper()


def count_bullets(text: str) -> int:
    """Lines that start with ``-``, ``*`` or ``•`` and a space (numbered lines are not bullets)."""
    return sum(bool(_BULLET.match(line)) for line in text.splitlines())


def has_bullets(text: str, n: int) -> bool:
    """Exactly ``n`` bullet points (other lines, such as a heading, are allowed)."""
    return count_bullets(text) == n


def fewer_words(text: str, n: int) -> bool:
    """At least one and fewer than ``n`` words (whitespace-separated)."""
    return 0 < len(text.split()) < n


def includes_word(text: str, word: str) -> bool:
    """``word`` as a whole word, any case ("garden" is not found in "gardens")."""
    return bool(_word_pattern(word).search(text))


def excludes_word(text: str, word: str) -> bool:
    """A non-empty answer without ``word`` as a whole word, any case."""
    return bool(text.strip()) and not includes_word(text, word)


def ends_with_question(text: str) -> bool:
    """The last character, ignoring closing quotes, brackets and markdown, is ``?``."""
    return text.rstrip(_CLOSERS).endswith("?")


def has_no_commas(text: str) -> bool:
    """A non-empty answer with no comma (ASCII or full-width)."""
    return bool(text.strip()) and "," not in text and "，" not in text


def starts_with_word(text: str, word: str) -> bool:
    """The first word, without the quotes, markdown or punctuation around it, is ``word`` (any case):
    "Yes, ..." starts with "yes", "Today's ..." does not start with "today"."""
    first = text.split(maxsplit=1)[0] if text.strip() else ""
    return first.strip(_PUNCTUATION).lower() == word.lower()


def count_sentences(text: str) -> int:
    """Pieces between ``.``, ``!``, ``?`` followed by a space, and line breaks, that hold a letter or digit."""
    return sum(any(c.isalnum() for c in piece) for piece in _SENTENCE_END.split(text.strip()))


def has_sentences(text: str, n: int) -> bool:
    """Exactly ``n`` sentences (:func:`count_sentences`)."""
    return count_sentences(text) == n


def is_quoted(text: str) -> bool:
    """The whole answer sits inside one pair of double quotes (straight or curly)."""
    t = text.strip()
    return len(t) >= 3 and t[0] in "\"“" and t[-1] in "\"”" and bool(t[1:-1].strip())


def is_digits_only(text: str) -> bool:
    """Only digits (a final full stop allowed)."""
    return re.fullmatch(r"\d+\.?", text.strip()) is not None


VERIFIERS = {
    "lowercase": is_lowercase, "uppercase": is_uppercase, "bullets": has_bullets, "max_words": fewer_words,
    "include_word": includes_word, "exclude_word": excludes_word, "end_question": ends_with_question,
    "no_commas": has_no_commas, "start_word": starts_with_word, "sentences": has_sentences,
    "quoted": is_quoted, "digits_only": is_digits_only,
}


# ----------------------------------------------------------------------------- data

def load_general_texts(general: Path = GENERAL_TEXT, replies: Path | None = HELDOUT_REPLIES) -> list:
    """The NLL texts: the course's paragraphs (strings), then the held-out assistant rows (whose
    ``chosen`` reply is scored given the prompt); ``replies=None`` leaves the rows out."""
    with open(general, encoding="utf-8") as f:
        texts: list = [json.loads(line)["text"] for line in f if line.strip()]
    if replies is not None:
        texts += load_preferences(replies)[0]
    return texts


def load_instructions(path: Path = INSTRUCTIONS) -> list[dict]:
    """The instruction rows: ``prompt`` (messages), ``kind`` (a key of :data:`VERIFIERS`), ``args``."""
    rows = load_prompts(path)
    unknown = sorted({r.get("kind") for r in rows} - set(VERIFIERS), key=str)
    if unknown:
        raise ValueError(f"{path}: unknown instruction kind(s) {unknown}; known: {sorted(VERIFIERS)}")
    return rows


# ----------------------------------------------------------------------------- general_nll

def _scored_sequence(tokenizer, item) -> tuple[list[int], list[int]]:
    """``(context_ids, scored_ids)`` of a text (a string or ``{"text": ...}``: every token after
    the first is scored) or of a row with ``prompt`` and ``chosen`` (the reply given the prompt,
    tokenized as in training by :func:`~dpo_lib.features.tokenize_pair`)."""
    if isinstance(item, dict) and "text" in item:
        item = item["text"]
    if isinstance(item, str):
        ids = list(tokenizer(item)["input_ids"])
        if len(ids) < 2:
            raise ValueError(f"general_nll: {item!r} has fewer than 2 tokens, nothing to score")
        return ids[:1], ids[1:]
    pair = tokenize_pair(tokenizer, {**item, "rejected": item["chosen"]})
    return pair["prompt_ids"], pair["chosen_ids"]


@torch.no_grad()
def general_nll(model, tokenizer, texts_or_rows: list, *, batch_size: int = BATCH_SIZE,
                device: str | torch.device | None = None) -> list[float]:
    """Mean per-token negative log-likelihood (nats) of each text or row, in the input order.

    Texts are strings (or ``{"text": ...}``); rows have ``prompt`` and ``chosen`` (see
    :func:`_scored_sequence`). Batches are length-sorted and right-padded; the LM head runs only
    from the earliest scored position of the batch on.
    """
    device = device or next(model.parameters()).device
    seqs = [_scored_sequence(tokenizer, x) for x in texts_or_rows]
    order = sorted(range(len(seqs)), key=lambda i: (sum(map(len, seqs[i])), i))
    out = [math.nan] * len(seqs)
    was_training = model.training
    model.eval()
    for k in range(0, len(order), batch_size):
        chunk = order[k:k + batch_size]
        batch = batch_to(collate_sequences([seqs[i][0] for i in chunk], [seqs[i][1] for i in chunk],
                                           tokenizer.pad_token_id), device)
        start = min(len(seqs[i][0]) for i in chunk) - 1                           # logit t scores token t+1
        T = batch["input_ids"].shape[1]
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       use_cache=False, logits_to_keep=T - start).logits.float()  # (B, T - start, V)
        logp = sequence_logprobs(logits, batch["input_ids"][:, start:], batch["completion_mask"][:, start:],
                                 average=True)                                     # (B,) mean log-prob
        for i, v in zip(chunk, logp.tolist()):
            out[i] = -v
    model.train(was_training)
    return out


# ----------------------------------------------------------------------------- instruction_following

def instruction_following(model, tokenizer, prompts: list[dict], *, max_new_tokens: int = MAX_NEW_TOKENS,
                          batch_size: int = 64, temperature: float = 0.0, seed: int = 0) -> dict:
    """Answer each instruction row (``prompt``, ``kind``, ``args``) and check it with its verifier.

    Greedy decoding by default (``temperature=0``; ``seed`` only matters when sampling). Returns
    per-prompt lists, in the input order: ``pass`` (1.0 when the answer ended within
    ``max_new_tokens`` and its verifier accepts it, else 0.0), ``ended`` (the answer holds EOS)
    and ``text`` (the answer).
    """
    samples = generate(model, tokenizer, [r["prompt"] for r in prompts], n=1, max_new_tokens=max_new_tokens,
                       temperature=temperature, batch_size=batch_size, seed=seed, progress=False)
    eos = tokenizer.eos_token_id
    ended = [eos in s["response_ids"] for s in samples]
    passed = [float(e and VERIFIERS[r["kind"]](s["text"], **r.get("args", {})))
              for r, s, e in zip(prompts, samples, ended)]
    return {"pass": passed, "ended": ended, "text": [s["text"] for s in samples]}


# ----------------------------------------------------------------------------- before / after

def measure(model, tokenizer, *, device: str | torch.device = "cpu", seed: int = 0,
            max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = BATCH_SIZE,
            texts: list | None = None, instructions: list[dict] | None = None) -> dict:
    """Both measures on the model as it is now, per example (call it before and after training).

    ``device`` is where the model sits (the NLL batches are moved there); ``texts`` and
    ``instructions`` default to :func:`load_general_texts` and :func:`load_instructions`.
    Returns ``general_nll`` (one float per text), ``instruction_following`` (1.0 / 0.0 per prompt),
    ``instruction_ended`` (bool per prompt) and ``instruction_answers`` (the answers).
    """
    texts = load_general_texts() if texts is None else texts
    instructions = load_instructions() if instructions is None else instructions
    nll = general_nll(model, tokenizer, texts, batch_size=batch_size, device=device)
    follow = instruction_following(model, tokenizer, instructions, max_new_tokens=max_new_tokens,
                                   batch_size=max(batch_size, len(instructions)), seed=seed)
    return {"general_nll": nll, "instruction_following": follow["pass"], "instruction_ended": follow["ended"],
            "instruction_answers": follow["text"]}


def paired_change(before: dict, after: dict) -> dict:
    """``<name>_before``, ``<name>_after``, ``<name>_change`` (after - before) and ``<name>_change_se``
    (the standard error of the per-example differences, :func:`dpo_lib.stats.gain`) for each name of
    :data:`MEASURES`."""
    out = {}
    for name in MEASURES:
        b, a = list(before[name]), list(after[name])
        if len(b) != len(a):
            raise ValueError(f"paired_change: {name} has {len(b)} examples before and {len(a)} after")
        change = gain(a, b)
        out.update({f"{name}_before": mean_and_se(b)[0], f"{name}_after": mean_and_se(a)[0],
                    f"{name}_change": change.value, f"{name}_change_se": change.se})
    return out
