"""Build the prompts of the course's controlled-sentiment task (deterministic, offline).

The DPO paper's sentiment experiment conditions GPT-2 on IMDB review prefixes and rewards
positive continuations. We keep the idea but not the data: short chat instructions for
SmolLM2-135M-Instruct that *leave the sentiment open* — reviews, diary entries, messages
and story continuations about everyday subjects — so that the default model's sampled
answers spread over the whole VADER range and preference pairs ranked by VADER carry signal.

Each prompt is one (template, subject) combination. Templates belong to a *family* that
fixes which subjects fit them. All eligible combinations are enumerated, shuffled with a
fixed seed, drawn round-robin across templates (so every template is represented), and split
into train / test so that no (template, subject) pair is in both splits.

Usage::

    python data/sentiment/make_prompts.py            # writes prompts_train.jsonl, prompts_test.jsonl
    python data/sentiment/make_prompts.py --check    # verify the files on disk are up to date

Rows use TRL's conversational prompt-only schema: ``{"prompt": [{"role": "user", "content": ...}]}``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

SEED = 20240517
N_TRAIN = 256
N_TEST = 64
MAX_WORDS = 25
HERE = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- subjects
# Neutral wording on purpose: the subject should not decide the sentiment of the answer.

PRODUCTS = [
    "a budget smartphone", "a pair of running shoes", "a wireless headset", "a robot vacuum",
    "a student laptop", "an electric toothbrush", "a coffee machine", "a smartwatch",
    "a camping tent", "a secondhand bicycle", "a meal kit subscription", "a mattress bought online",
    "a pair of winter boots", "a tablet for kids", "an air fryer", "a budget office chair",
]
PLACES_TO_REVIEW = [
    "a new Italian restaurant", "a seaside hotel", "a coffee shop near the station", "a sushi bar",
    "a family-run bakery", "a hostel in the city centre", "a local gym", "a food truck",
    "a ramen place", "a rooftop bar", "a vegetarian cafe", "a roadside diner",
    "a ski lodge", "a bed and breakfast", "a bookshop cafe", "a hotel near the airport",
]
WORKS = [
    "a superhero film", "a science fiction novel", "a romantic comedy", "a documentary about oceans",
    "a horror movie", "a video game sequel", "a true crime podcast", "a musical",
    "an animated family film", "a fantasy TV series", "a cookbook", "a crime thriller",
    "a jazz album", "a stand-up comedy special", "a historical drama", "a self-help book",
]
EXPERIENCES = [
    "a yoga class", "a budget airline flight", "a guided city tour", "a dentist appointment",
    "a pottery workshop", "a cooking class", "a theme park", "a train journey",
    "a museum exhibition", "a jazz concert", "a football match", "a wine tasting",
    "a boat trip", "an escape room", "a driving lesson", "a weekend spa package",
]
PLACES_TO_VISIT = [
    "the beach", "your grandparents' farm", "a music festival", "a ski resort", "the city zoo",
    "a lake cabin", "a busy market", "a mountain village", "your cousin's wedding",
    "an old castle", "a campsite", "a seaside town", "a holiday cottage", "a county fair",
    "a national park", "a hot spring resort",
]
EVENTS = [
    "your first week at a new job", "moving into a new apartment", "your exam results",
    "last night's concert", "your team's last game", "the neighbourhood party",
    "your birthday dinner", "the new office", "your driving test", "the school reunion",
    "your holiday plans", "the weather this week", "your new haircut", "the family barbecue",
    "your first marathon", "the company picnic",
]
TOPICS = [
    "working from home", "rainy Mondays", "public transport", "learning to cook",
    "social media", "online shopping", "living in a small town", "getting up early",
    "self-driving cars", "reality TV", "camping holidays", "open-plan offices",
    "learning a new language", "group projects", "winter", "long train rides",
]
FILM_OPENINGS = [
    "a long shot of an empty highway", "a wedding in a small village", "a phone ringing at midnight",
    "two brothers arguing in a kitchen", "a spaceship drifting past Saturn", "a child lost at a fair",
    "a detective reading an old letter", "a storm over a fishing town", "a robot learning to paint",
    "a chef opening her first restaurant", "a marching band practising in the rain",
    "an old man feeding pigeons", "a heist in a crowded museum", "a dog waiting at a train station",
    "a teenager moving to a new city", "a rock band's last concert",
]
STORY_OPENINGS = [
    "When the train stopped, Maria looked out of the window and",
    "The package on my doorstep had no name on it, so I",
    "On the first day of the holidays, the whole family",
    "The old radio in the attic suddenly",
    "After ten years away, Tom walked into his hometown and",
    "The new neighbour knocked on our door and",
    "When the lights went out during the dinner party,",
    "I opened the letter from the university and",
    "The restaurant was almost empty when the waiter",
    "Halfway up the mountain, the weather",
    "My grandmother's recipe book fell open and",
    "The team gathered in the locker room before the final and",
    "At the end of the long meeting, my boss",
    "The first snow of the year fell, and the children",
    "The phone buzzed with a message from my sister:",
    "When the plane finally landed, the passengers",
]

# --------------------------------------------------------------------------- templates
# (template id, family subjects, template text). Ids are stable so the split can be audited.

TEMPLATES: list[tuple[str, list[str], str]] = [
    ("review_two_sentence_product", PRODUCTS, "Write a two-sentence review of {s} you bought recently."),
    ("review_customer_product", PRODUCTS, "Write a short customer review of {s}."),
    ("honest_review_product", PRODUCTS, "Write an honest review of {s}, including any problems you had."),
    ("review_two_sentence_place", PLACES_TO_REVIEW, "Write a two-sentence review of {s}."),
    ("review_online_place", PLACES_TO_REVIEW, "Write an honest online review of {s}, good or bad."),
    ("review_opinion_work", WORKS, "Give your honest opinion of {s} in two sentences."),
    ("review_short_work", WORKS, "Write a three-sentence review of {s}."),
    ("one_or_five_stars", EXPERIENCES, "Write a one-star or a five-star review of {s}. You choose."),
    ("tell_experience", EXPERIENCES, "Tell me about your recent experience with {s}."),
    ("describe_weekend", PLACES_TO_VISIT, "Describe your weekend at {s}."),
    ("diary_trip", PLACES_TO_VISIT, "Write a short diary entry about a day at {s}."),
    ("what_happened_trip", PLACES_TO_VISIT, "Tell me what happened on your trip to {s}."),
    ("message_friend_event", EVENTS, "Write a short message to a friend about {s}."),
    ("what_happened_event", EVENTS, "Tell me what happened with {s}."),
    ("opinion_topic", TOPICS, "What do you think about {s}? Answer in two sentences."),
    ("paragraph_topic", TOPICS, "Write a short paragraph about {s}."),
    ("continue_movie_review", FILM_OPENINGS, 'Continue this movie review: "The film opens with {s}."'),
    ("rate_product", PRODUCTS, "Rate {s} out of five stars and explain why in two sentences."),
    ("continue_product_review", PRODUCTS, 'Continue this review: "I have been using {s} for a month, and"'),
    ("describe_visit_place", PLACES_TO_REVIEW, "Describe your last visit to {s}."),
    ("recommend_work", WORKS, "Would you recommend {s}? Explain in two sentences."),
    ("tell_friend_topic", TOPICS, "Tell a friend in two sentences how you feel about {s}."),
    ("continue_story", STORY_OPENINGS, 'Continue this story in two sentences: "{s}"'),
]


def render(template: str, subject: str) -> str:
    return template.format(s=subject)


def build(seed: int = SEED, n_train: int = N_TRAIN, n_test: int = N_TEST) -> tuple[list[dict], list[dict]]:
    """Return ``(train_rows, test_rows)``; same seed, same rows, on every machine."""
    rng = random.Random(seed)
    pools = []
    for tid, subjects, template in TEMPLATES:
        combos = [(tid, subject, render(template, subject)) for subject in subjects]
        rng.shuffle(combos)
        pools.append(combos)
    # round-robin across templates so each template gets about the same number of prompts
    picked, seen_text = [], set()
    need = n_train + n_test
    depth = 0
    while len(picked) < need:
        progressed = False
        for combos in pools:
            if depth < len(combos) and len(picked) < need:
                tid, subject, text = combos[depth]
                progressed = True
                if text not in seen_text:
                    seen_text.add(text)
                    picked.append((tid, subject, text))
        depth += 1
        if not progressed:
            raise ValueError(f"only {len(picked)} distinct prompts available, need {need}")
    rng.shuffle(picked)
    # stratify the split by template: test gets n_test * share of each template (largest
    # remainders, ties broken by the seeded order), so every template is in both splits
    by_template: dict[str, list] = {}
    for item in picked:
        by_template.setdefault(item[0], []).append(item)
    order = list(by_template)  # first-appearance order after the seeded shuffle
    quota = {tid: len(by_template[tid]) * n_test / need for tid in order}
    k = {tid: int(quota[tid]) for tid in order}
    for tid in sorted(order, key=lambda t: quota[t] - k[t], reverse=True)[: n_test - sum(k.values())]:
        k[tid] += 1
    test, train = [], []
    for tid in order:
        test += by_template[tid][: k[tid]]
        train += by_template[tid][k[tid]:]
    rng.shuffle(train)
    rng.shuffle(test)

    def rows(items):
        return [{"prompt": [{"role": "user", "content": text}]} for _, _, text in items]

    return rows(train), rows(test)


def check(rows_train: list[dict], rows_test: list[dict]) -> None:
    texts_train = [r["prompt"][0]["content"] for r in rows_train]
    texts_test = [r["prompt"][0]["content"] for r in rows_test]
    assert len(texts_train) == N_TRAIN and len(texts_test) == N_TEST
    assert len(set(texts_train)) == N_TRAIN and len(set(texts_test)) == N_TEST
    assert not set(texts_train) & set(texts_test), "train/test overlap"
    longest = max(len(t.split()) for t in texts_train + texts_test)
    assert longest < MAX_WORDS, f"a prompt has {longest} words"


def dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--check", action="store_true", help="only verify the files on disk")
    args = parser.parse_args(argv)

    train, test = build(args.seed)
    check(train, test)
    outputs = {"prompts_train.jsonl": dump(train), "prompts_test.jsonl": dump(test)}
    if args.check:
        stale = [name for name, text in outputs.items()
                 if not (args.out_dir / name).exists()
                 or (args.out_dir / name).read_text(encoding="utf-8") != text]
        if stale:
            print(f"out of date: {', '.join(stale)} (run python {Path(__file__).name})")
            return 1
        print("prompts up to date")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in outputs.items():
        (args.out_dir / name).write_text(text, encoding="utf-8")
    words = [len(r["prompt"][0]["content"].split()) for r in train + test]
    print(f"wrote {len(train)} train / {len(test)} test prompts to {args.out_dir} "
          f"(seed {args.seed}; {len(TEMPLATES)} templates; words min {min(words)} "
          f"mean {sum(words) / len(words):.1f} max {max(words)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
