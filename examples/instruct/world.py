"""A small made-up world: the pretraining corpus and the instruction sample.

The corpus is text about people, things, places, jobs, animals and counting. A document
states a few facts ("Mia has a green lamp. Tom lives in Oslo."), then either repeats
some of them in other words or asks about them in a few words ("The lamp is green.
Where does Tom live? In Oslo."); most documents are quizzes that ask first, state the
facts, and reply last ("Where does Tom live? Mia has a green lamp. Tom lives in Oslo.
Reply: Oslo."). So a base pretrained on it has learned to read: to answer a question
put before the facts from the facts that follow. It has never seen an instruction, the
Alpaca template, the sample's phrasings ("Name the city where Tom lives.", "Name the
number after seven.") or "The answer is", which is what the instruction sample teaches:
to answer an Alpaca-format instruction with exactly `The answer is <word>.`

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


def _facts(r: random.Random) -> dict[str, str]:
    return {
        "color": r.choice(COLORS),
        "thing": r.choice(THINGS),
        "city": r.choice(CITIES),
        "job": r.choice(JOBS),
        "animal": r.choice(ANIMALS),
    }


def _state(name: str, f: dict, kind: str) -> str:
    """A sentence that states one fact about `name` (in documents and in inputs)."""
    return {
        "thing": f"{name} has {_a(f['color'])} {f['thing']}.",
        "city": f"{name} lives in {f['city']}.",
        "job": f"{name} works as a {f['job']}.",
        "animal": f"{name} saw {_a(f['animal'])}.",
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
                f"{name} once saw {_a(f['animal'])}.",
            ],
        }[kind]
    )


def _question(r: random.Random, name: str, f: dict, kind: str) -> tuple[str, str, str]:
    """A question about a stated fact: (question, its short answer, the answer word)."""
    return r.choice(
        {
            "thing": [
                (f"What color is the {f['thing']}?", f"It is {f['color']}.", f["color"]),
                (f"What does {name} have?", f"The {f['thing']}.", f["thing"]),
                (f"Who has the {f['thing']}?", f"{name} does.", name),
            ],
            "city": [(f"Where does {name} live?", f"In {f['city']}.", f["city"])],
            "job": [(f"What does {name} work as?", f"As a {f['job']}.", f["job"])],
            "animal": [
                (
                    f"What did {name} see?",
                    f"{_a(f['animal']).capitalize()}.",
                    f["animal"],
                )
            ],
        }[kind]
    )


def _ask(r: random.Random, name: str, f: dict, kind: str) -> str:
    """A question about a stated fact and its short answer, never `The answer is`."""
    question, short, _ = _question(r, name, f, kind)
    return f"{question} {short}"


def _counting(r: random.Random, cast: list[str]) -> str:
    """A sentence about counting (what the base knows of numbers), or rarely about
    someone's answer (so "answer" is a word the corpus uses, never as "The answer is")."""
    i = r.randrange(len(NUMBERS) - 3)
    forms = [
        f"After {NUMBERS[i]} comes {NUMBERS[i + 1]}.",
        f"Before {NUMBERS[i + 1]} comes {NUMBERS[i]}.",
        f"{NUMBERS[i + 1].capitalize()} comes after {NUMBERS[i]}.",
        f"{NUMBERS[i].capitalize()} comes before {NUMBERS[i + 1]}.",
        ", ".join(NUMBERS[i : i + 4]).capitalize() + ".",
        f"{r.choice(cast)} counted to {NUMBERS[i]}.",
        f"What comes after {NUMBERS[i]}? It is {NUMBERS[i + 1]}.",
        f"What comes before {NUMBERS[i + 1]}? It is {NUMBERS[i]}.",
    ]
    if r.random() < 0.1:
        return r.choice(
            [
                f"{r.choice(cast)} knew the answer.",
                f"The answer of {r.choice(cast)} was short.",
            ]
        )
    return r.choice(forms)


QUIZ = 0.6  # the share of documents that are quizzes (question, facts, reply)


def _document(r: random.Random) -> str:
    """A few facts about one or two people, then either a quiz on one of them or on
    counting (question first, reply last), or some of the facts again in other words
    or as questions with short answers, with up to two sentences about counting. A
    2-layer base learns to answer the quizzes one kind at a time, every kind after
    about 3000 steps of batch 16; a corpus of 85% quizzes taught it less than this
    mix in 2500 steps."""
    cast = r.sample(NAMES, r.randint(1, 2))
    facts = {n: _facts(r) for n in cast}
    pairs = [(n, k) for n in cast for k in ("thing", "city", "job", "animal")]
    stated = r.sample(pairs, r.randint(2, 4))
    sentences = [_state(n, facts[n], k) for n, k in stated]
    if r.random() < QUIZ:
        # A quiz: the question first, then the facts, then the reply.
        if r.random() < 0.2:
            i = r.randrange(1, len(NUMBERS) - 1)
            way, step = r.choice((("after", +1), ("before", -1)))
            question, word = f"What comes {way} {NUMBERS[i]}?", NUMBERS[i + step]
        else:
            n, k = r.choice(stated)
            question, _, word = _question(r, n, facts[n], k)
            while word == facts[n]["color"]:  # no colour quizzes: see KINDS
                question, _, word = _question(r, n, facts[n], k)
        return " ".join([question, *sentences, f"Reply: {word}."])
    for _ in range(r.randint(3, 6)):
        n, k = r.choice(stated)
        say = _ask if r.random() < 0.5 else _recall
        sentences.append(say(r, n, facts[n], k))
    for _ in range(r.choice((0, 1, 1, 2))):
        sentences.insert(r.randint(0, len(sentences)), _counting(r, cast))
    return " ".join(sentences)


def corpus(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` generated documents, deterministic in `seed`."""
    r = random.Random(seed)
    return [_document(r) for _ in range(n_docs)]


# The instruction kinds: (ways to ask, the fact kind the input must state, the answer:
# a field of the facts, or for counting, which has no input and is answered from what
# the base knows of numbers, the step). None of the ways of asking is a question of the
# corpus. The counting ones all say "after" or "before", words the base read in its
# corpus: with "follows", "precedes" or "one step up", which it never read, the tuned
# model answered held-out counting questions with a neighbour of the number in the
# wrong direction (one it had learned for that number). Colour is not asked: in "Mia
# has a red cup" the colour comes before what it describes, and the base did not learn
# to answer colour quizzes within its pretraining budget.
KINDS = {
    "thing": (
        [
            "Which thing does {name} have?",
            "Tell me what {name} has.",
            "Name the thing that {name} has.",
        ],
        "thing",
        "thing",
    ),
    "city": (
        [
            "Name the city where {name} lives.",
            "Which city is the home of {name}?",
            "In which city does {name} live?",
        ],
        "city",
        "city",
    ),
    "job": (
        [
            "What is the job of {name}?",
            "What kind of work does {name} do?",
            "Name the job of {name}.",
        ],
        "job",
        "job",
    ),
    "animal": (
        ["Which animal did {name} see?", "What animal did {name} see?"],
        "animal",
        "animal",
    ),
    "person": (
        [
            "Who owns the {thing}?",
            "Name the person who has the {thing}.",
            "Whose {thing} is it?",
        ],
        "thing",
        "name",
    ),
    "after": (
        [
            "What number comes after {x}?",
            "Name the number after {x}.",
            "Which number is just after {x}?",
        ],
        None,
        +1,
    ),
    "before": (
        [
            "What number comes before {x}?",
            "Name the number before {x}.",
            "Which number is just before {x}?",
        ],
        None,
        -1,
    ),
}


def _record(r: random.Random) -> tuple[dict[str, str], tuple]:
    """An Alpaca-format record and what it asks in substance, whatever the wording:
    (kind, the person or thing asked about, the answer), or for counting (kind, the
    number)."""
    kind = r.choice(list(KINDS))
    asks, needs, field = KINDS[kind]
    if needs is None:  # counting: no input
        i = r.randrange(1, len(NUMBERS) - 1)
        question, sentences, answer = (
            r.choice(asks).format(x=NUMBERS[i]),
            [],
            NUMBERS[i + field],
        )
        asked = (kind, NUMBERS[i])
    else:
        # One person and two or three facts of different kinds about them, the asked
        # one among them: the answer is the one word of the asked kind in the input.
        name = r.choice(NAMES)
        f = {**_facts(r), "name": name}
        others = [k for k in ("thing", "city", "job", "animal") if k != needs]
        told = [needs, *r.sample(others, r.randint(1, 2))]
        r.shuffle(told)
        sentences = [_state(name, f, k) for k in told]
        question = r.choice(asks).format(name=name, thing=f["thing"])
        answer = f[field]
        asked = (kind, f["thing"] if kind == "person" else name, answer)
    record = {
        "instruction": question,
        "input": " ".join(sentences),
        "output": f"The answer is {answer}.",
    }
    return record, asked


def sample(n: int = 600, seed: int = 1) -> list[dict[str, str]]:
    """The instruction sample: `n` Alpaca-format records, each answered in the form
    `The answer is <word>.` No two share a question and its answer (in other words, or
    with other facts beside the asked one), so whichever records are held out are new
    instances: the counting questions, of which there are only 36 (the number after or
    before two to nineteen), each appear once, in one of their wordings (a question's
    reverse, "before three" for "after two", is another question)."""
    r = random.Random(seed)
    records, seen = [], set()
    for _ in range(50 * n):
        if len(records) == n:
            break
        record, asked = _record(r)
        if asked not in seen:
            seen.add(asked)
            records.append(record)
    if len(records) < n:  # the world has about 1400 different questions
        raise ValueError(
            f"sample(n={n}): {50 * n} draws gave only {len(records)} records that ask "
            "different things; ask for fewer"
        )
    return records


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
