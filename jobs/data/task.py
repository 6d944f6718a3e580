"""The built-in task: short factual questions whose one-sentence answer our own code computes.

Eight templated families (addition, subtraction, comparison, weekdays, months, opposites,
plurals, unit conversions), mixed round-robin. Each reference is one plain sentence that
restates the question ("17 plus 25 is 42."), so the similarity reward pays for a correct, terse
answer in that pattern; a 135M chat model tends to ramble or miss the fact, which leaves RL room.

Every family enumerates its distinct facts (a + b and b + a are one fact); phrasing is drawn
per item. The held-out split is taken first from the shuffled stream, so it does not depend on
num_train, and no fact appears in both splits.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import combinations
from typing import Any

from rayrlhf.actors.rl.trajectory import Prompt

DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = (
    "January February March April May June July August September October November December"
).split()
OPPOSITES = [
    tuple(pair.split("/"))
    for pair in (
        "hot/cold big/small fast/slow happy/sad up/down open/closed light/dark early/late "
        "full/empty old/new rich/poor strong/weak tall/short hard/soft wet/dry loud/quiet "
        "clean/dirty right/wrong first/last day/night inside/outside love/hate win/lose "
        "push/pull buy/sell top/bottom thick/thin heavy/light high/low always/never "
        "friend/enemy before/after true/false north/south east/west give/take come/go "
        "cheap/expensive safe/dangerous easy/difficult near/far awake/asleep sweet/sour"
    ).split()
]
PLURALS = [
    tuple(pair.split("/"))
    for pair in (
        "mouse/mice child/children foot/feet tooth/teeth man/men woman/women person/people "
        "goose/geese ox/oxen sheep/sheep fish/fish deer/deer knife/knives leaf/leaves "
        "wolf/wolves life/lives half/halves wife/wives shelf/shelves loaf/loaves thief/thieves "
        "city/cities baby/babies party/parties story/stories lady/ladies box/boxes bus/buses "
        "dish/dishes church/churches fox/foxes potato/potatoes tomato/tomatoes hero/heroes "
        "cactus/cacti fungus/fungi crisis/crises criterion/criteria cat/cats dog/dogs "
        "book/books tree/trees car/cars house/houses apple/apples bird/birds chair/chairs "
        "key/keys boy/boys toy/toys day/days horse/horses glass/glasses watch/watches"
    ).split()
]
UNITS = [  # (singular, plural, target unit, factor, largest count)
    ("hour", "hours", "minutes", 60, 12),
    ("minute", "minutes", "seconds", 60, 10),
    ("day", "days", "hours", 24, 7),
    ("week", "weeks", "days", 7, 12),
    ("year", "years", "months", 12, 10),
    ("meter", "meters", "centimeters", 100, 10),
    ("kilometer", "kilometers", "meters", 1000, 10),
]
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
SUFFIXES = [" Answer in one short sentence.", " Reply with one sentence.", " Give a one-sentence answer."]

Render = Callable[[Any, random.Random], tuple[str, str]]


def _add(p: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    x, y = p if rng.random() < 0.5 else p[::-1]
    q = rng.choice(["What is {x} plus {y}?", "Add {x} and {y}.", "What is the sum of {x} and {y}?"])
    return q.format(x=x, y=y), f"{x} plus {y} is {x + y}."


def _subtract(p: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    a, b = p
    q = rng.choice([
        "What is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "What do you get if you take {b} away from {a}?",
    ])
    return q.format(a=a, b=b), f"{a} minus {b} is {a - b}."


def _compare(p: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    x, y = p if rng.random() < 0.5 else p[::-1]
    word = rng.choice(["larger", "smaller"])
    answer = max(x, y) if word == "larger" else min(x, y)
    q = rng.choice([
        "Which is {w}, {x} or {y}?",
        "Which number is {w}: {x} or {y}?",
        "Of {x} and {y}, which one is {w}?",
    ])
    return q.format(w=word, x=x, y=y), f"The {word} of {x} and {y} is {answer}."


def _span(unit: str, offset: int) -> str:
    """'the day after', 'two months before': how far and which way along a cycle."""
    side = "after" if offset > 0 else "before"
    n = abs(offset)
    return f"the {unit} {side}" if n == 1 else f"{NUMBER_WORDS[n]} {unit}s {side}"


def _cycle(names: list[str], unit: str) -> Render:
    def render(p: tuple[int, int], rng: random.Random) -> tuple[str, str]:
        start, offset = p
        span = _span(unit, offset)
        answer = names[(start + offset) % len(names)]
        q = rng.choice([
            "What is {s} {n}?",
            f"Which {unit} is {{s}} {{n}}?",
            f"Tell me which {unit} is {{s}} {{n}}.",
        ])
        return q.format(s=span, n=names[start]), f"{span[0].upper()}{span[1:]} {names[start]} is {answer}."

    return render


def _opposite(p: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    word, other = p
    q = rng.choice([
        "What is the opposite of {w}?",
        "What word means the opposite of {w}?",
        "Give the opposite of the word {w}.",
    ])
    return q.format(w=word), f"The opposite of {word} is {other}."


def _plural(p: tuple[str, str], rng: random.Random) -> tuple[str, str]:
    word, plural = p
    q = rng.choice([
        "What is the plural of {w}?",
        "What is the plural form of the word {w}?",
        "How do you say {w} in the plural?",
    ])
    return q.format(w=word), f"The plural of {word} is {plural}."


def _units(p: tuple[int, int], rng: random.Random) -> tuple[str, str]:
    (one, many, target, factor, _), n = UNITS[p[0]], p[1]
    source = one if n == 1 else many
    q = rng.choice(["How many {t} are in {n} {s}?", "Convert {n} {s} to {t}.", "{n} {s} is how many {t}?"])
    return q.format(t=target, n=n, s=source), f"{n} {source} is {n * factor} {target}."


OFFSETS = [-3, -2, -1, 1, 2, 3]
FAMILIES: dict[str, tuple[list[Any], Render]] = {
    "addition": (list(combinations(range(1, 76), 2)) + [(a, a) for a in range(1, 76)], _add),
    "subtraction": ([(a, b) for a in range(10, 100) for b in range(1, a)], _subtract),
    "comparison": (list(combinations(range(1, 100), 2)), _compare),
    "weekday": ([(d, o) for d in range(7) for o in OFFSETS], _cycle(DAYS, "day")),
    "month": ([(m, o) for m in range(12) for o in OFFSETS], _cycle(MONTHS, "month")),
    "opposite": (OPPOSITES + [(b, a) for a, b in OPPOSITES], _opposite),
    "plural": (PLURALS, _plural),
    "units": ([(i, n) for i, u in enumerate(UNITS) for n in range(1, u[4] + 1)], _units),
}


HELD_OUT_BLOCK = 100
"""Items at the head of the stream that training never uses."""


def round_robin(families: dict[str, tuple[list[Any], Any]], rng: random.Random) -> list[tuple[str, Any, Any]]:
    """(family, item, render) for every item once: each family's pool shuffled, then taken in turn, so
    any prefix mixes the families evenly."""
    queues = []
    for name, (pool, render) in families.items():
        items = list(pool)
        rng.shuffle(items)
        queues.append((name, items, render))
    longest = max(len(items) for _, items, _ in queues)
    return [(name, items[i], render) for i in range(longest) for name, items, render in queues if i < len(items)]


def split_stream(stream: list[Any], num_train: int, num_eval: int, held_out_block: int, what: str) -> tuple[list, list]:
    """(train, held-out) of a stream of distinct items: held-out from its head, training after the
    first held_out_block items, so a smaller num_eval is a prefix of a larger one and no training set
    ever shares an item with any held-out set."""
    if num_train < 0 or num_eval < 0:
        raise ValueError(f"num_train and num_eval must be >= 0, got {num_train} and {num_eval}")
    start = max(held_out_block, num_eval)
    if start + num_train > len(stream):
        raise ValueError(f"{what} has {len(stream)} distinct items; asked for {num_train} training items "
                         f"after {start} held-out ones")  # fmt: skip
    return stream[start : start + num_train], stream[:num_eval]


def family_stream(seed: int) -> list[tuple[str, str, str]]:
    """Every fact once as (family, question, reference), families round-robin."""
    rng = random.Random(seed)
    out: list[tuple[str, str, str]] = []
    for name, fact, render in round_robin(FAMILIES, rng):
        question, reference = render(fact, rng)
        out.append((name, question + rng.choice(SUFFIXES), reference))
    return out


def builtin_task(num_train: int, num_eval: int, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """Train and held-out prompts; the same seed gives the same lists (split_stream: a search ranks on
    16 held-out prompts, the other 84 stay unseen). Ids: train 0..num_train-1, held-out from num_train on."""
    train, held_out = split_stream(family_stream(seed), num_train, num_eval, HELD_OUT_BLOCK, "the built-in task")
    train_prompts = [Prompt(id=i, text=q, reference=r) for i, (_, q, r) in enumerate(train)]
    eval_prompts = [Prompt(id=num_train + i, text=q, reference=r) for i, (_, q, r) in enumerate(held_out)]
    return train_prompts, eval_prompts
