"""The course's capability checks: general text for ``general_nll`` and verifiable instructions.

Every paragraph and prompt below is original text written for this course (license: CC-BY-4.0,
see data/README.md, "Capability checks"); nothing is copied or paraphrased from an existing dataset or page.
No randomness, no model and no network: the files are the rows below, in this order.

Usage::

    python data/general/make_general.py          # writes general_text.jsonl and instructions.jsonl
    python data/general/make_general.py --check  # verify the files on disk are up to date

Rows::

    general_text.jsonl   {"topic": ..., "text": ...}
    instructions.jsonl   {"prompt": [{"role": "user", "content": ...}], "kind": ..., "args": {...}}

``kind`` names a verifier of :data:`dpo_lib.capability.VERIFIERS`, called as
``VERIFIERS[kind](answer, **args)``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MAX_WORDS = 70

# (topic, paragraph): short explanatory text on varied topics, none about sentiment or reviews.
PARAGRAPHS = [
    ("physics", "Sound needs a medium to travel through. In air at room temperature it moves at roughly "
     "343 metres per second, about four times slower than in water. That is why you see lightning before "
     "you hear the thunder: the light arrives almost at once, while the sound takes about three seconds to "
     "cover each kilometre."),
    ("physics", "A lever lets a small force move a heavy load. The trick is distance: pushing down on the long "
     "end through a large arc lifts the short end through a small one. The work done on both sides is about "
     "the same, so what you gain in force you pay for in distance."),
    ("physics", "Ice floats because water expands when it freezes. The molecules lock into an open hexagonal "
     "pattern that takes up more room than the liquid, so ice is about nine percent less dense. Lakes "
     "therefore freeze from the top down, and the ice layer insulates the water below."),
    ("chemistry", "Rust forms when iron reacts with oxygen in the presence of water. The reddish flakes are "
     "iron oxides, and they do not protect the metal underneath, so corrosion keeps going. Paint, oil and "
     "a coating of zinc all slow it down by keeping water and air away from the surface."),
    ("chemistry", "Baking soda is a base, and vinegar contains acetic acid. When the two meet they react and "
     "release carbon dioxide gas, which is why the mixture fizzes. Bakers rely on a similar reaction: the "
     "gas bubbles trapped in a batter make a cake rise in the oven."),
    ("biology", "Plants make their own food through photosynthesis. Using the energy of sunlight, the green "
     "pigment chlorophyll helps turn carbon dioxide and water into sugar, and oxygen is released as a by-"
     "product. Most of the oxygen we breathe was produced this way by plants and algae."),
    ("biology", "The human heart has four chambers. The right side pumps blood to the lungs, where it picks up "
     "oxygen, and the left side pumps that oxygen-rich blood to the rest of the body. Valves between the "
     "chambers keep the blood flowing in one direction."),
    ("biology", "Bees communicate the location of flowers with a waggle dance. The angle of the dance relative "
     "to vertical tells other bees the direction of the food compared with the sun, and the length of the "
     "waggling run tells them roughly how far away it is."),
    ("biology", "Vaccines train the immune system without causing the disease. They show the body a harmless "
     "piece or a weakened form of a germ, and the immune system learns to recognise it. If the real germ "
     "appears later, the body can respond much faster."),
    ("biology", "Sleep is not wasted time. During deep sleep the body repairs tissue, and during dream sleep "
     "the brain seems to sort and store memories. Adults who regularly sleep less than six hours tend to "
     "have worse concentration and a weaker immune response."),
    ("astronomy", "The Moon does not make its own light. We see it because it reflects sunlight, and its "
     "phases come from how much of its lit half faces the Earth. A full cycle from new moon to new moon "
     "takes about twenty-nine and a half days."),
    ("astronomy", "Seasons are caused by the tilt of the Earth's axis, not by its distance from the Sun. When "
     "the northern half leans towards the Sun, it gets longer days and more direct light, and it is summer "
     "there. At the same time it is winter in the southern half."),
    ("astronomy", "Mars looks red because its surface dust is rich in iron oxide. The planet is smaller than "
     "the Earth, has a thin atmosphere made mostly of carbon dioxide, and a day there lasts only about forty "
     "minutes longer than ours."),
    ("earth science", "Earthquakes happen when stress builds up along a fault and the rock suddenly slips. "
     "The energy spreads out as waves through the ground. Most large earthquakes occur near the edges of "
     "tectonic plates, such as the ring of faults around the Pacific Ocean."),
    ("earth science", "Clouds form when warm, moist air rises and cools. Cooler air cannot hold as much water "
     "vapour, so the vapour condenses onto tiny particles of dust or salt, making droplets. Billions of "
     "these droplets together are what we see as a cloud."),
    ("earth science", "A river carries sand and mud downstream, and where it slows down near the sea it drops "
     "them. Over thousands of years this sediment can build a delta, a flat fan of land split by many small "
     "channels. Deltas are often very fertile farmland."),
    ("geography", "Deserts are defined by how little rain they get, not by how hot they are. A region that "
     "receives less than about 250 millimetres of precipitation a year counts as a desert, which is why the "
     "cold, dry interior of Antarctica is the largest desert on Earth."),
    ("geography", "Mountains change the weather around them. Moist air forced up one side cools and drops its "
     "rain there, so that slope is often green and wet. The air that comes down the far side is dry, leaving "
     "a rain shadow where few plants grow."),
    ("history", "Before mechanical clocks, people measured time with sundials, water clocks and candles marked "
     "with lines. Each had a weakness: a sundial is useless at night or under clouds, and a water clock runs "
     "slower as its container empties unless the flow is carefully controlled."),
    ("history", "The printing press with movable type made books far cheaper to produce. Instead of copying "
     "every page by hand, a printer could arrange metal letters once and press hundreds of identical sheets. "
     "As books spread, more people learned to read."),
    ("history", "Canals were the highways of the early industrial age. A single horse walking along a towpath "
     "could pull a barge carrying many tonnes of coal, far more than it could pull in a cart on a muddy road. "
     "Railways later took over much of this traffic."),
    ("mathematics", "A prime number has exactly two divisors: one and itself. The first few are 2, 3, 5, 7 and "
     "11. Every whole number greater than one can be written as a product of primes in only one way, which "
     "is why primes are often called the building blocks of arithmetic."),
    ("mathematics", "Percentages compare a part with a whole of one hundred. A rise of 50 percent followed by a "
     "fall of 50 percent does not bring you back where you started: 100 becomes 150, and half of 150 is 75. "
     "The second change is applied to a different base."),
    ("mathematics", "The average of a list of numbers can hide a lot. The mean is pulled by extreme values, so "
     "a few very high incomes raise the mean income of a town. The median, the middle value when the list "
     "is sorted, is not affected by a handful of outliers."),
    ("mathematics", "The area of a circle grows with the square of its radius. Doubling the radius of a pizza "
     "gives you four times as much pizza, which is why one large pizza often holds more than two medium ones "
     "for a similar price."),
    ("computing", "A computer stores everything as bits, each of which is either zero or one. Eight bits make a "
     "byte, enough to represent 256 different values. Text, pictures and sound are all turned into long "
     "sequences of bytes before a computer can work with them."),
    ("computing", "A password is safer when it is long. Each extra character multiplies the number of guesses "
     "an attacker must try, so a phrase of four random words can be harder to crack than a short string of "
     "symbols. Using a different password for every site matters even more."),
    ("computing", "A search engine does not read the whole web when you type a query. It has already visited "
     "pages in advance and built an index, a giant table that maps each word to the pages containing it. "
     "Answering a query means looking words up in that index and ranking the results."),
    ("computing", "Backing up files means keeping copies somewhere else. A common rule of thumb is to keep "
     "three copies of important data, on two different kinds of storage, with one copy away from home. A "
     "backup that has never been restored in a test may not work when you need it."),
    ("computing", "A spreadsheet is a grid of cells, each holding a number, some text or a formula. A formula "
     "can refer to other cells, so changing one value updates every result that depends on it. This makes "
     "spreadsheets useful for budgets, schedules and quick calculations."),
    ("cooking", "Bread rises because yeast feeds on the sugars in flour and releases carbon dioxide. Kneading "
     "develops gluten, a stretchy network of proteins that traps the gas. In the oven the bubbles expand, "
     "the yeast dies, and the structure sets into a soft crumb."),
    ("cooking", "Salt does more than make food taste salty. A small amount makes sweet flavours seem stronger "
     "and bitter ones weaker. Salting meat some time before cooking also helps it hold on to its juices, so "
     "it stays tender."),
    ("cooking", "Water boils at a lower temperature high in the mountains because the air pressure is lower. "
     "At around three thousand metres it boils at about 90 degrees Celsius, so pasta and eggs take longer "
     "to cook even though the pot is bubbling."),
    ("health", "Drinking water matters most when you sweat a lot, for example during exercise or in hot "
     "weather. Thirst is a reasonable guide for healthy adults. Pale yellow urine usually means you are "
     "drinking enough, while dark urine suggests you need more fluid."),
    ("health", "Washing hands with soap works because soap molecules have one end that sticks to water and "
     "another that sticks to grease. They pull oily dirt and many germs off the skin so that water can rinse "
     "them away. Twenty seconds of scrubbing is a good habit."),
    ("health", "Regular walking is one of the simplest forms of exercise. Thirty minutes a day at a brisk "
     "pace strengthens the heart, helps control weight and improves mood. It needs no equipment beyond "
     "comfortable shoes."),
    ("economics", "Inflation means that prices in general are rising, so the same amount of money buys less "
     "than before. A little inflation is considered normal in most economies, but when prices climb very "
     "fast, savings lose their value and planning becomes difficult."),
    ("economics", "Interest is the price of borrowing money. If you lend 100 coins at five percent a year, you "
     "get 105 back after one year. With compound interest, the next year's five percent is calculated on "
     "105, so the amount grows a little faster each year."),
    ("economics", "Specialisation makes trade worthwhile. If one village is good at growing wheat and another "
     "at catching fish, both can end up with more food by focusing on what they do best and exchanging the "
     "surplus, rather than each trying to do everything."),
    ("language", "Many English words come from Latin through French. After the Norman conquest, French was "
     "the language of the court, which is why English has pairs such as cow and beef, or pig and pork: the "
     "animal kept the old English name, the meat on the table the French one."),
    ("language", "A dictionary does not decide what words mean; it records how people use them. Editors "
     "collect examples from books, newspapers and speech, and a new word is added once it has been used "
     "widely for some time. Definitions change as usage changes."),
    ("language", "Learning a second language is easier with short daily practice than with long occasional "
     "sessions. Hearing and repeating whole phrases helps more than memorising isolated words, because "
     "phrases carry grammar and rhythm along with vocabulary."),
    ("arts", "Perspective drawing makes a flat picture look deep. Parallel lines that move away from the "
     "viewer, such as the edges of a road, are drawn so that they meet at a vanishing point on the horizon. "
     "Objects are drawn smaller the farther away they are meant to be."),
    ("arts", "A musical scale is a set of notes arranged by pitch. Western music often uses a major scale of "
     "seven notes, and the eighth note, the octave, has exactly twice the frequency of the first. Melodies "
     "built from the same scale tend to sound as if they belong together."),
    ("engineering", "Bridges must handle forces that push and pull. In an arch bridge, the weight presses the "
     "stones together, and stone is very strong under compression. A suspension bridge instead hangs the "
     "road from steel cables, which are strong under tension."),
    ("engineering", "A refrigerator moves heat rather than creating cold. A fluid called a refrigerant "
     "absorbs heat as it evaporates inside the fridge, and a compressor pumps it outside, where it releases "
     "that heat through coils at the back. That is why the back of a fridge feels warm."),
    ("engineering", "Electric cars use batteries to drive an electric motor. The motor turns most of the "
     "stored energy into motion, and when the car slows down it can work as a generator, recovering some "
     "energy that a petrol car would waste as heat in its brakes."),
    ("everyday", "A map's scale tells you how distances on paper relate to distances on the ground. On a map "
     "with a scale of one to fifty thousand, two centimetres on the map stand for one kilometre in reality. "
     "Contour lines show height: where they are close together, the slope is steep."),
    ("everyday", "Houseplants die more often from too much water than from too little. Roots need air as well "
     "as moisture, and soil that stays soaked suffocates them. Checking that the top few centimetres of soil "
     "are dry before watering is a simple way to avoid this."),
    ("everyday", "Time zones exist because the Sun is overhead at different moments in different places. The "
     "world is divided into zones that are usually one hour apart, so that noon on the clock is roughly "
     "when the Sun is highest in the sky."),
]

# (kind, args, user prompt). Every prompt can be satisfied by a short answer (see the README: a reply
# that has not ended by the token cap counts as a failure).
INSTRUCTIONS = [
    ("lowercase", {}, "Describe a rainy afternoon in one sentence. Write your whole answer in lowercase "
     "letters only, with no capital letters."),
    ("lowercase", {}, "Name three fruits. Use only lowercase letters in your answer."),
    ("lowercase", {}, "In one sentence, what is a library? Answer entirely in lowercase."),
    ("uppercase", {}, "Write a short warning sign for a wet floor. Your whole answer must be in capital "
     "letters."),
    ("uppercase", {}, "Say hello to a new classmate in one short sentence, written entirely in UPPERCASE."),
    ("bullets", {"n": 3}, "List three things to pack for a beach trip. Use exactly three bullet points "
     "starting with '- ' and nothing else."),
    ("bullets", {"n": 2}, "Give two tips for drinking more water. Answer with exactly two bullet points "
     "starting with '- ' and no other text."),
    ("bullets", {"n": 4}, "Name four colours of the rainbow as exactly four bullet points, each line starting "
     "with '- '."),
    ("max_words", {"n": 10}, "What is the capital of France? Answer in fewer than 10 words."),
    ("max_words", {"n": 20}, "Explain what a thermometer does in fewer than 20 words."),
    ("max_words", {"n": 15}, "Why do people use umbrellas? Reply in fewer than 15 words."),
    ("max_words", {"n": 5}, "Which animal says 'moo'? Answer in fewer than 5 words."),
    ("include_word", {"word": "blue"}, "Describe the sky on a clear day in one sentence. Include the word "
     "'blue'."),
    ("include_word", {"word": "garden"}, "Write one sentence about spring that includes the word 'garden'."),
    ("include_word", {"word": "bicycle"}, "Suggest a healthy way to get to work in one sentence, and use the "
     "word 'bicycle'."),
    ("exclude_word", {"word": "cat"}, "Describe a pet that many people keep at home in one sentence, without "
     "using the word 'cat'."),
    ("exclude_word", {"word": "water"}, "In one sentence, what do fish need to live? Do not use the word "
     "'water'."),
    ("end_question", {}, "Write one sentence inviting a friend to lunch. End your answer with a question "
     "mark."),
    ("end_question", {}, "Ask me a single question about my favourite book."),
    ("end_question", {}, "Write a short question you could ask a new neighbour."),
    ("no_commas", {}, "Describe your ideal weekend in one sentence. Do not use any commas."),
    ("no_commas", {}, "Name three vegetables in one sentence without using any commas."),
    ("no_commas", {}, "Explain in one sentence why exercise is healthy. Do not use commas."),
    ("start_word", {"word": "Yes"}, "Is the Earth round? Start your answer with the word 'Yes'."),
    ("start_word", {"word": "Today"}, "Write one sentence about the weather that starts with the word "
     "'Today'."),
    ("start_word", {"word": "First"}, "How do you make a cup of tea? Begin your answer with the word 'First'."),
    ("sentences", {"n": 1}, "What is a volcano? Answer in exactly one sentence."),
    ("sentences", {"n": 2}, "Describe a forest in exactly two sentences."),
    ("sentences", {"n": 1}, "Why is the sea salty? Answer in exactly one sentence."),
    ("quoted", {}, "Write a short motto for a school. Wrap your entire answer in double quotation marks."),
    ("quoted", {}, "Give a one-line greeting for a birthday card, wrapped in double quotes."),
    ("digits_only", {}, "What is 7 plus 5? Reply with the number in digits only, no words."),
    ("uppercase", {}, "What colour is grass? Answer in capital letters only."),
    ("digits_only", {}, "How many legs does a spider have? Answer with digits only."),
    ("digits_only", {}, "What is 10 minus 3? Reply with digits only."),
    ("exclude_word", {"word": "sun"}, "In one sentence, describe a summer morning without using the word 'sun'."),
    ("start_word", {"word": "No"}, "Can a fish climb a tree? Start your answer with the word 'No'."),
    ("include_word", {"word": "river"}, "Write one sentence about a bridge that uses the word 'river'."),
    ("quoted", {}, "Suggest a name for a bakery, wrapped in double quotation marks."),
    ("sentences", {"n": 3}, "Describe your morning routine in exactly three sentences."),
]


def words(text: str) -> int:
    return len(text.split())


def validate() -> None:
    from dpo_lib.capability import VERIFIERS  # the kinds must be the library's

    texts = [t for _, t in PARAGRAPHS]
    assert len(set(texts)) == len(texts), "duplicate paragraph"
    for text in texts:
        assert words(text) <= MAX_WORDS, f"{words(text)} words: {text[:60]}..."
    prompts = [p for _, _, p in INSTRUCTIONS]
    assert len(set(prompts)) == len(prompts), "duplicate prompt"
    for kind, args, _ in INSTRUCTIONS:
        assert kind in VERIFIERS, f"unknown kind {kind!r}"
        VERIFIERS[kind]("a", **args)  # the arguments fit the verifier


def dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def outputs() -> dict[str, str]:
    general = [{"topic": topic, "text": text} for topic, text in PARAGRAPHS]
    instructions = [{"prompt": [{"role": "user", "content": p}], "kind": kind, "args": args}
                    for kind, args, p in INSTRUCTIONS]
    return {"general_text.jsonl": dump(general), "instructions.jsonl": dump(instructions)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=HERE)
    parser.add_argument("--check", action="store_true", help="only verify the files on disk")
    args = parser.parse_args(argv)
    validate()
    files = outputs()
    if args.check:
        stale = [n for n, t in files.items()
                 if not (args.out_dir / n).exists() or (args.out_dir / n).read_text(encoding="utf-8") != t]
        if stale:
            print(f"out of date: {', '.join(stale)} (run python {Path(__file__).name})")
            return 1
        print("general set up to date")
        return 0
    for name, text in files.items():
        (args.out_dir / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(PARAGRAPHS)} paragraphs and {len(INSTRUCTIONS)} instructions to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
