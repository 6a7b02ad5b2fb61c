"""A small made-up world: the pretraining corpus and the instruction sample.

The corpus is plain declarative text about people, things, places, jobs, animals and
counting ("Mia has a green lamp. Tom lives in Oslo. After seven comes eight."), each
document stating a few facts and then repeating them in other words ("The lamp is
green. Tom went home to Oslo."). It has no questions, no instructions, and "answer"
only in other phrases, never "The answer is", so a base model pretrained on it knows
the world but not the behaviour the instruction sample teaches: to answer an
Alpaca-format instruction with exactly `The answer is <word>.`

`python -m instruct.world` (from `examples/`) rewrites `examples/data/alpaca_sample.json`.
"""

from __future__ import annotations

import json
import os
import random
import re

NAMES = (
    "Mia Tom Ava Leo Zoe Sam Ivy Max Eva Ben Lily Noah Ella Jack Ruby Owen Nina "
    "Hugo Rosa Finn"
).split()
COLORS = "red blue green yellow black white brown pink purple orange gray".split()
THINGS = (
    "cup lamp hat book chair ball kite bag box car coat bike door bowl pen boat".split()
)
CITIES = (
    "Oslo Paris Rome Cairo Lima Tokyo Dublin Madrid Vienna Berlin Athens Prague Quito Delhi"
).split()
JOBS = (
    "baker doctor farmer teacher painter driver pilot nurse singer tailor cook writer"
).split()
ANIMALS = "cat dog horse bird fox goat duck sheep cow mouse".split()
NUMBERS = (
    "one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen twenty"
).split()

ANSWER = re.compile(r"^The answer is [A-Za-z]+\.$")
SAMPLE_PATH = os.path.join(
    os.path.dirname(__file__), os.pardir, "data", "alpaca_sample.json"
)


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _facts(r: random.Random, name: str) -> dict[str, str]:
    return {
        "color": r.choice(COLORS),
        "thing": r.choice(THINGS),
        "city": r.choice(CITIES),
        "job": r.choice(JOBS),
        "animal": r.choice(ANIMALS),
        "seen": r.choice(COLORS),
    }


def _state(name: str, f: dict, kind: str) -> str:
    """A sentence that introduces one fact about `name`."""
    return {
        "thing": f"{name} has {_a(f['color'])} {f['thing']}.",
        "city": f"{name} lives in {f['city']}.",
        "job": f"{name} works as a {f['job']}.",
        "animal": f"{name} saw {_a(f['seen'])} {f['animal']} near the {f['thing']}.",
    }[kind]


def _recall(r: random.Random, name: str, f: dict, kind: str) -> str:
    """A later sentence that repeats a stated fact in other words. The fact's value
    comes last, after what identifies it (the thing, or the person), so a reader
    that looks the fact up earlier in the document can predict it."""
    return r.choice(
        {
            "thing": [
                f"The {f['thing']} is {f['color']}.",
                f"The {f['thing']} of {name} is {f['color']}.",
                f"The {f['thing']} belongs to {name}.",
                f"The {f['color']} {f['thing']} belongs to {name}.",
            ],
            "city": [
                f"{name} went home to {f['city']}.",
                f"The city of {name} is {f['city']}.",
            ],
            "job": [f"{name} is a good {f['job']}.", f"The job of {name} is {f['job']}."],
            "animal": [
                f"The animal {name} saw was {_a(f['animal'])}.",
                f"The {f['animal']} that {name} saw was {f['seen']}.",
            ],
        }[kind]
    )


def _filler(r: random.Random, cast: list[str]) -> str:
    i = r.randrange(len(NUMBERS) - 3)
    name = r.choice(cast)
    return r.choice(
        [
            f"After {NUMBERS[i]} comes {NUMBERS[i + 1]}.",
            f"Before {NUMBERS[i + 1]} comes {NUMBERS[i]}.",
            ", ".join(NUMBERS[i : i + 4]).capitalize() + ".",
            f"{name} counted to {NUMBERS[i]}.",
            f"{name} knew the answer.",
            f"The answer of {name} was short.",
        ]
    )


def _document(r: random.Random) -> str:
    """A few facts about a small cast, then several of them again in other words (one
    may come back more than once), and sometimes a sentence about counting. Most of
    what can be predicted in a document is a fact stated earlier in it: within the
    pretraining budget, a small base learns from these to copy a fact of the asked
    kind from its context, where documents that mostly stated new facts taught it
    no copying at all (it does not yet reliably pick the fact of the right person)."""
    cast = r.sample(NAMES, r.randint(2, 3))
    facts = {n: _facts(r, n) for n in cast}
    pairs = [(n, k) for n in cast for k in ("thing", "city", "job", "animal")]
    stated = r.sample(pairs, r.randint(2, 4))
    sentences = [_state(n, facts[n], k) for n, k in stated]
    for _ in range(r.randint(3, 6)):
        n, k = r.choice(stated)
        sentences.append(_recall(r, n, facts[n], k))
    if r.random() < 0.3:
        sentences.insert(r.randint(0, len(sentences)), _filler(r, cast))
    return " ".join(sentences)


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` generated documents, deterministic in `seed`."""
    r = random.Random(seed)
    return [_document(r) for _ in range(n_docs)]


def _record(r: random.Random) -> dict[str, str]:
    a, b = r.sample(NAMES, 2)
    (c1, c2), (t1, t2) = r.sample(COLORS, 2), r.sample(THINGS, 2)
    (city1, city2), (j1, j2) = r.sample(CITIES, 2), r.sample(JOBS, 2)
    animal = r.choice(ANIMALS)
    i = r.randrange(1, len(NUMBERS) - 1)
    has = [f"{a} has {_a(c1)} {t1}.", f"{b} has {_a(c2)} {t2}."]
    tasks = [  # (ways to ask, the sentences of the input, the answer)
        (
            [
                "What color is the {t}?",
                "Tell me the color of the {t}.",
                "Which color does the {t} have?",
            ],
            has,
            c1,
        ),
        (
            [
                "Where does {n} live?",
                "Name the city where {n} lives.",
                "In which city does {n} live?",
            ],
            [f"{a} lives in {city1}.", f"{b} lives in {city2}."],
            city1,
        ),
        (
            ["What is the job of {n}?", "What does {n} work as?", "Name the job of {n}."],
            [f"{a} works as a {j1}.", f"{b} works as a {j2}."],
            j1,
        ),
        (["Who has the {t}?", "Name the person who has the {t}."], has, a),
        (
            ["Which animal did {n} see?", "What animal did {n} see?"],
            [f"{a} saw {_a(c1)} {animal} near the {t1}."],
            animal,
        ),
        (
            [
                "What number comes after {x}?",
                "Which number follows {x}?",
                "Count one step up from {x}.",
            ],
            [],
            NUMBERS[i + 1],
        ),
        (
            ["What number comes before {x}?", "Which number precedes {x}?"],
            [],
            NUMBERS[i - 1],
        ),
    ]
    asks, sentences, answer = tasks[r.randrange(len(tasks))]
    question = r.choice(asks).format(t=t1, n=a, x=NUMBERS[i])
    r.shuffle(sentences)  # which of the two people comes first
    return {
        "instruction": question,
        "input": " ".join(sentences),
        "output": f"The answer is {answer}.",
    }


def sample(n: int = 600, seed: int = 1) -> list[dict[str, str]]:
    """The instruction sample: `n` Alpaca-format records, each answered in the form
    `The answer is <word>.`"""
    r = random.Random(seed)
    return [_record(r) for _ in range(n)]


def score(
    responses: list[str], expected: list[str], from_input: list[bool] | None = None
) -> dict[str, float]:
    """Behaviour score: the share of responses in the `The answer is <word>.` format,
    and the share that are exactly the expected answer; with `from_input` (whether
    each record's answer is in its input, or must come from what the base learned of
    the world), also the exact share of each kind (`exact_input`, `exact_world`, None
    where there is none) and their counts (`n_input`, `n_world`)."""
    n = max(len(responses), 1)
    right = [x.strip() == y.strip() for x, y in zip(responses, expected)]
    out = {
        "format": sum(bool(ANSWER.match(x.strip())) for x in responses) / n,
        "exact": sum(right) / n,
    }
    if from_input is not None:
        for kind, want in (("input", True), ("world", False)):
            hits = [ok for ok, f in zip(right, from_input) if f == want]
            out[f"n_{kind}"] = len(hits)
            out[f"exact_{kind}"] = sum(hits) / len(hits) if hits else None
    return out


if __name__ == "__main__":
    with open(SAMPLE_PATH, "w", encoding="utf-8") as f:
        json.dump(sample(), f, indent=1)
        f.write("\n")
    print(f"wrote {os.path.normpath(SAMPLE_PATH)}")
