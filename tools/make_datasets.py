"""Deterministic toy datasets for the MuxTune multi-task quickstart.

Four small JSONL datasets are generated, one JSON object per line of the form
``{"prompt": ..., "completion": ...}`` (format ``prompt_completion``: the loss
is taken on the completion only).  Every completion starts with a space so it
tokenizes as a continuation of the prompt.  The tasks are designed to be
learnable by LoRA on a ~135M model (SmolLM2-135M-Instruct) within a few dozen
optimizer steps at batch size 8: each uses one fixed prompt template, a tiny
answer vocabulary, and an answer that is a deterministic, keyword-driven
function of the prompt.  They also have clearly different length profiles
(approximate token counts use ~1.3 tokens per whitespace-separated word), which
is what makes them interesting for multi-task packing / scheduling:

``sentiment.jsonl`` (400 examples, ~64 tokens each)
    Short product or movie reviews assembled from template phrases.  Positive
    reviews only use clearly positive words, negative reviews only clearly
    negative ones, mixed with neutral filler.  Prompt ``"Review: ...\\nSentiment:"``,
    completion ``" positive"`` or ``" negative"`` (balanced 50/50).

``qa.jsonl`` (300 examples, ~128 tokens each)
    Reading-comprehension multiple choice about a fictional town.  A short
    context paragraph (a two-sentence intro plus 3-4 fact sentences from fixed
    tables) contains the fact being asked about; the question lists four
    options A-D.  Exactly one option occurs in the context, so the answer is
    findable from the prompt.  Completion is the letter, e.g. ``" B"``; the
    letters are balanced.

``entailment.jsonl`` (200 examples, ~256 tokens each)
    A premise paragraph of many simple fact sentences about fictional people,
    followed by a hypothesis.  The hypothesis either restates one premise
    sentence verbatim (``" entailment"``) or changes / negates one of its facts
    (``" contradiction"``).  Balanced 50/50.

``instructions.jsonl`` (300 examples, ~30-200 tokens, variable)
    Simple instruction following with an exact deterministic answer: reverse
    the order of words, write words in uppercase, sort numbers ascending, or
    sort words alphabetically.  The input length varies widely.

Only the standard library is used; all randomness comes from
``random.Random`` instances seeded from ``seed`` and all iteration is over
fixed, ordered tables, so output is byte-identical across runs and platforms.
The files shipped in ``muxtune/tools/data`` are ``generate_all(..., seed=0)``.

Usage::

    python -m muxtune.tools.make_datasets --out DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

__all__ = [
    "DATASETS",
    "generate_all",
    "make_sentiment",
    "make_qa",
    "make_entailment",
    "make_instructions",
    "approx_tokens",
    "write_jsonl",
]

TOKENS_PER_WORD = 1.3

# dataset name -> (file name, number of examples, per-dataset seed offset)
DATASETS: dict[str, tuple[str, int, int]] = {
    "sentiment": ("sentiment.jsonl", 400, 1),
    "qa": ("qa.jsonl", 300, 2),
    "entailment": ("entailment.jsonl", 200, 3),
    "instructions": ("instructions.jsonl", 300, 4),
}

Example = dict[str, str]


def approx_tokens(text: str) -> int:
    """Rough token estimate: ~1.3 tokens per whitespace-separated word."""
    return round(len(text.split()) * TOKENS_PER_WORD)


def _rng(seed: int, offset: int) -> random.Random:
    # Integer seeds only: no dependence on str hashing / PYTHONHASHSEED.
    return random.Random(seed * 1009 + offset)


def _balanced_labels(rng: random.Random, labels: list[str], n: int) -> list[str]:
    out = [labels[i % len(labels)] for i in range(n)]
    rng.shuffle(out)
    return out


# --------------------------------------------------------------------------
# 1. sentiment
# --------------------------------------------------------------------------

_PRODUCTS = [
    "blender",
    "laptop",
    "backpack",
    "coffee maker",
    "phone case",
    "desk lamp",
    "vacuum cleaner",
    "pair of headphones",
    "rain jacket",
    "kitchen knife",
    "water bottle",
    "office chair",
    "toaster",
    "keyboard",
    "tent",
]
_MOVIES = [
    "thriller",
    "comedy",
    "space movie",
    "documentary",
    "animated film",
    "western",
    "mystery film",
    "romance",
    "war drama",
    "horror movie",
    "musical",
    "heist movie",
    "sports drama",
    "fantasy film",
]

_POS_OPEN = [
    "I absolutely love this {x}.",
    "This {x} is excellent.",
    "What a wonderful {x}.",
    "This {x} is fantastic and I am delighted.",
    "Honestly, this {x} is amazing.",
    "I am so happy with this {x}.",
]
_NEG_OPEN = [
    "I really hate this {x}.",
    "This {x} is terrible.",
    "What an awful {x}.",
    "This {x} is horrible and I am disappointed.",
    "Honestly, this {x} is dreadful.",
    "I am so unhappy with this {x}.",
]
_POS_PRODUCT = [
    "It works perfectly and feels very sturdy.",
    "The quality is superb and it was worth every penny.",
    "Setup was easy and it performs great every day.",
    "It is reliable, well made and a joy to use.",
    "Everything about it is brilliant.",
]
_NEG_PRODUCT = [
    "It broke after a week and feels very flimsy.",
    "The quality is poor and it was a waste of money.",
    "Setup was a nightmare and it fails every day.",
    "It is unreliable, badly made and a pain to use.",
    "Everything about it is awful.",
]
_POS_MOVIE = [
    "The acting was brilliant and the story was gripping.",
    "The plot was clever and the ending was beautiful.",
    "Every scene was a delight and the music was superb.",
    "The characters were charming and the pacing was perfect.",
    "It was a masterpiece from start to finish.",
]
_NEG_MOVIE = [
    "The acting was wooden and the story was boring.",
    "The plot was stupid and the ending was awful.",
    "Every scene was a chore and the music was annoying.",
    "The characters were dull and the pacing was painfully slow.",
    "It was a disaster from start to finish.",
]
_NEUTRAL_PRODUCT = [
    "I bought it last month for my apartment.",
    "It arrived in a brown box on a Tuesday.",
    "My brother uses a different brand at home.",
    "I use it mostly in the morning.",
    "It comes in three colors.",
]
_NEUTRAL_MOVIE = [
    "I watched it with two friends on a Friday night.",
    "It runs for about two hours.",
    "We saw it at the small cinema downtown.",
    "The film was released last spring.",
    "My sister picked it for our weekly movie night.",
]
_POS_CLOSE = [
    "Highly recommended, five stars!",
    "I would happily buy it again.",
    "Great value, I love it.",
    "Definitely worth it, a wonderful choice.",
]
_NEG_CLOSE = [
    "Not recommended, one star.",
    "I would never buy it again.",
    "Terrible value, I regret it.",
    "Definitely avoid it, an awful choice.",
]


def make_sentiment(rng: random.Random, n: int) -> list[Example]:
    labels = _balanced_labels(rng, ["positive", "negative"], n)
    out: list[Example] = []
    for label in labels:
        is_movie = rng.random() < 0.5
        x = rng.choice(_MOVIES if is_movie else _PRODUCTS)
        pos = label == "positive"
        opener = rng.choice(_POS_OPEN if pos else _NEG_OPEN).format(x=x)
        if is_movie:
            body_pool = _POS_MOVIE if pos else _NEG_MOVIE
            neutral_pool = _NEUTRAL_MOVIE
        else:
            body_pool = _POS_PRODUCT if pos else _NEG_PRODUCT
            neutral_pool = _NEUTRAL_PRODUCT
        body = rng.sample(body_pool, 2)
        neutral = rng.sample(neutral_pool, 2)
        close = rng.choice(_POS_CLOSE if pos else _NEG_CLOSE)
        sentences = [opener, neutral[0], body[0], neutral[1], body[1], close]
        prompt = "Review: " + " ".join(sentences) + "\nSentiment:"
        out.append({"prompt": prompt, "completion": " " + label})
    return out


# --------------------------------------------------------------------------
# 2. qa (reading comprehension, multiple choice)
# --------------------------------------------------------------------------

_TOWNS = ["Millbrook", "Ashford", "Willowmere", "Stonebridge", "Fernhollow", "Larkspur Bay"]
_PLACES = [
    "bakery",
    "library",
    "post office",
    "school",
    "town hall",
    "bookshop",
    "fire station",
    "museum",
    "pharmacy",
    "train station",
    "market",
    "chapel",
]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "orange", "purple", "brown", "gray"]
_PEOPLE = ["Alice", "Bruno", "Clara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Keiko", "Lars"]
_ANIMALS = ["cat", "dog", "parrot", "goat", "rabbit", "tortoise", "goose", "pony", "ferret", "hedgehog"]
_DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
_MATERIALS = ["brick", "stone", "wood", "glass", "marble", "concrete", "clay", "steel"]
_NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven"]

# attribute -> (value table, statement template, question template)
_QA_ATTRS: list[tuple[list[str], str, str]] = [
    (_COLORS, "The door of the {p} is painted {v}.", "Which color is the door of the {p}?"),
    (_PEOPLE, "The {p} is run by a person named {v}.", "Who runs the {p}?"),
    (_ANIMALS, "A friendly {v} lives behind the {p}.", "Which animal lives behind the {p}?"),
    (_DAYS, "The {p} is closed every {v}.", "On which day is the {p} closed?"),
    (_MATERIALS, "The {p} was built from {v}.", "What was the {p} built from?"),
    (_NUMBERS, "The {p} has {v} windows facing the square.", "How many windows of the {p} face the square?"),
]

_QA_INTRO = [
    "{t} is a quiet town beside a slow river, and everyone there knows the buildings around the main square well. "
    "The notes below were written by a visitor who spent a whole week exploring the town.",
    "Visitors to {t} often walk around the old square, where most of the public buildings "
    "of the town stand close together. "
    "A local guide shared a few facts about them during a short afternoon tour.",
    "The small town of {t} has a busy square, and the local guidebook describes each of its buildings in detail. "
    "Here are some of the facts that the guidebook mentions about the square.",
]

_LETTERS = ["A", "B", "C", "D"]


def make_qa(rng: random.Random, n: int) -> list[Example]:
    answers = _balanced_labels(rng, _LETTERS, n)
    out: list[Example] = []
    for letter in answers:
        town = rng.choice(_TOWNS)
        attr_idx = rng.randrange(len(_QA_ATTRS))
        values, stmt, question = _QA_ATTRS[attr_idx]
        places = rng.sample(_PLACES, 4)
        target = places[0]
        # values: answer + 3 distractor options; none of the distractors is
        # mentioned in the context, so exactly one option occurs in the text.
        chosen = rng.sample(values, 5)
        answer, distractors, other_value = chosen[0], chosen[1:4], chosen[4]

        facts = [stmt.format(p=target, v=answer)]
        # one sentence with the same attribute about a different place (its
        # value is never an option), plus 1-2 sentences about other attributes.
        facts.append(stmt.format(p=places[1], v=other_value))
        other_attrs = [i for i in range(len(_QA_ATTRS)) if i != attr_idx]
        for j, ai in enumerate(rng.sample(other_attrs, rng.randint(1, 2))):
            ov, ostmt, _ = _QA_ATTRS[ai]
            facts.append(ostmt.format(p=places[2 + j], v=rng.choice(ov)))
        rng.shuffle(facts)

        options = list(distractors)
        options.insert(_LETTERS.index(letter), answer)
        context = rng.choice(_QA_INTRO).format(t=town) + " " + " ".join(facts)
        lines = [
            "Read the text and answer the question with the letter of the correct option.",
            "Text: " + context,
            "Question: " + question.format(p=target),
        ]
        lines += [f"{letter_}. {option}" for letter_, option in zip(_LETTERS, options)]
        lines.append("Answer:")
        out.append({"prompt": "\n".join(lines), "completion": " " + letter})
    return out


# --------------------------------------------------------------------------
# 3. entailment
# --------------------------------------------------------------------------

_E_PEOPLE = [
    "Mara",
    "Tobias",
    "Nadia",
    "Oskar",
    "Priya",
    "Quentin",
    "Rosa",
    "Samuel",
    "Tamsin",
    "Ulrich",
    "Vera",
    "Wendell",
    "Yusuf",
    "Zora",
    "Anouk",
    "Bastian",
]
_E_CITIES = ["Oakvale", "Port Ellis", "Redcliff", "Northwick", "Silverton", "Glenmoor", "Harrowgate", "Eastmere"]
_E_JOBS = ["baker", "nurse", "carpenter", "teacher", "pilot", "gardener", "librarian", "chemist", "tailor", "fisher"]
_E_VEHICLES = ["bicycle", "scooter", "car", "boat", "van", "motorbike"]
_E_HOBBIES = ["chess", "painting", "hiking", "pottery", "swimming", "knitting", "archery", "singing"]
_E_FOODS = ["soup", "pasta", "rice", "bread", "salad", "noodles", "curry", "pancakes"]
_E_INSTRUMENTS = ["violin", "piano", "flute", "guitar", "drum", "cello", "trumpet"]

# (slot table, positive template, negated template); {n} = name, {v} = value,
# {c} = color (vehicle only)
_E_COLORS = ["red", "blue", "green", "yellow", "white", "black", "purple", "brown", "gray"]  # no vowel-initial

_E_FACTS: list[tuple[list[str], str, str]] = [
    (_E_CITIES, "{n} lives in the city of {v}.", "{n} does not live in the city of {v}."),
    (_E_JOBS, "{n} has a job as a {v}.", "{n} does not have a job as a {v}."),
    (_E_VEHICLES, "{n} rides a {c} {v} to work.", "{n} does not ride a {c} {v} to work."),
    (_E_HOBBIES, "{n} enjoys {v} on weekends.", "{n} does not enjoy {v} on weekends."),
    (_E_FOODS, "{n} usually eats {v} for dinner.", "{n} never eats {v} for dinner."),
    (_E_INSTRUMENTS, "{n} plays the {v} in a local band.", "{n} does not play the {v} in a local band."),
]


def _e_sentence(tmpl: str, name: str, value: str, color: str) -> str:
    return tmpl.format(n=name, v=value, c=color)


def make_entailment(rng: random.Random, n: int) -> list[Example]:
    labels = _balanced_labels(rng, ["entailment", "contradiction"], n)
    out: list[Example] = []
    for label in labels:
        n_people, n_facts = 5, 5
        people = rng.sample(_E_PEOPLE, n_people)
        # each person: 5 of the 6 fact types -> 25 premise sentences
        facts: list[tuple[str, int, str, str]] = []  # (name, fact idx, value, color)
        for name in people:
            for fi in sorted(rng.sample(range(len(_E_FACTS)), n_facts)):
                table = _E_FACTS[fi][0]
                facts.append((name, fi, rng.choice(table), rng.choice(_E_COLORS)))
        # interleave people sentence-by-sentence in a fixed, readable order
        order = [facts[i * n_facts + k] for k in range(n_facts) for i in range(n_people)]
        premise = " ".join(_e_sentence(_E_FACTS[fi][1], nm, v, c) for nm, fi, v, c in order)

        name, fi, value, color = rng.choice(facts)
        table, pos_t, neg_t = _E_FACTS[fi]
        if label == "entailment":
            hyp = _e_sentence(pos_t, name, value, color)
        elif rng.random() < 0.5:
            hyp = _e_sentence(neg_t, name, value, color)  # negation
        else:
            # change the fact to a value that does not hold for this person
            held = {v for nm, f, v, _ in facts if nm == name and f == fi}
            new_v = rng.choice([v for v in table if v not in held])
            hyp = _e_sentence(pos_t, name, new_v, color)
        prompt = (
            "Decide whether the hypothesis follows from the premise. "
            "Answer entailment or contradiction.\n"
            f"Premise: {premise}\n"
            f"Hypothesis: {hyp}\n"
            "Answer:"
        )
        out.append({"prompt": prompt, "completion": " " + label})
    return out


# --------------------------------------------------------------------------
# 4. instructions
# --------------------------------------------------------------------------

_WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "garden",
    "window",
    "candle",
    "forest",
    "pencil",
    "bridge",
    "silver",
    "market",
    "ladder",
    "orange",
    "rocket",
    "meadow",
    "basket",
    "winter",
    "planet",
    "mirror",
    "tiger",
    "violin",
    "harbor",
    "lemon",
    "castle",
    "feather",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "mountain",
    "needle",
    "ocean",
    "pepper",
    "quilt",
    "ribbon",
    "saddle",
    "tunnel",
    "valley",
    "wagon",
]

_INSTR_TASKS = ["reverse", "uppercase", "sort_numbers", "sort_words"]
_INSTR_TEXT = {
    "reverse": "Reverse the order of these words.",
    "uppercase": "Write these words in uppercase.",
    "sort_numbers": "Sort these numbers from smallest to largest.",
    "sort_words": "Sort these words in alphabetical order.",
}


def make_instructions(rng: random.Random, n: int) -> list[Example]:
    tasks = _balanced_labels(rng, _INSTR_TASKS, n)
    out: list[Example] = []
    for task in tasks:
        # total ~ 1.3 * (8 + 2k) tokens -> k in [8, 70] gives ~31..192 tokens
        k = rng.randint(8, 70)
        if task == "sort_numbers":
            items = [str(rng.randint(0, 999)) for _ in range(k)]
            answer = [str(v) for v in sorted(int(s) for s in items)]
        else:
            items = [rng.choice(_WORDS) for _ in range(k)]
            if task == "reverse":
                answer = items[::-1]
            elif task == "uppercase":
                answer = [w.upper() for w in items]
            else:
                answer = sorted(items)
        prompt = f"Instruction: {_INSTR_TEXT[task]}\nInput: {' '.join(items)}\nOutput:"
        out.append({"prompt": prompt, "completion": " " + " ".join(answer)})
    return out


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------

_MAKERS = {
    "sentiment": make_sentiment,
    "qa": make_qa,
    "entailment": make_entailment,
    "instructions": make_instructions,
}


def write_jsonl(path: Path, rows: list[Example]) -> None:
    """Write rows as JSONL with a fixed, platform-independent encoding."""
    text = "".join(
        json.dumps({"prompt": r["prompt"], "completion": r["completion"]}, ensure_ascii=True) + "\n" for r in rows
    )
    path.write_bytes(text.encode("utf-8"))


def make_examples(name: str, seed: int, n: int) -> list[Example]:
    """`n` examples of dataset `name` drawn with `seed` (another seed gives unseen examples)."""
    offset = DATASETS[name][2]
    return _MAKERS[name](_rng(seed, offset), n)


def generate_all(out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Generate all four datasets into ``out_dir``; return name -> file path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, (fname, n, offset) in DATASETS.items():
        rows = _MAKERS[name](_rng(seed, offset), n)
        path = out_dir / fname
        write_jsonl(path, rows)
        paths[name] = path
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m muxtune.tools.make_datasets",
        description="Generate the MuxTune quickstart toy datasets (JSONL, prompt_completion).",
    )
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = ap.parse_args(argv)
    for name, path in generate_all(args.out, args.seed).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
