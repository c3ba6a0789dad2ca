"""Generate the shipped sample dataset (deterministic; re-running reproduces the files).

    python data/sample/generate.py

The task: name the topic of a templated sentence (sports, weather, food, music,
travel or science). It is keyword-driven, so a tiny model can learn it in a couple of
minutes on a CPU, and its answers are exactly checkable. Every sentence is a
distinct (template, subject, keyword, detail) combination, so any held-out row is
a sentence never seen in training. Two files in the two common SFT shapes: chat
(``messages``) and alpaca (``instruction``/``input``/``output``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
SEED = 20261129
N_CHAT = 2400
N_ALPACA = 600

TOPICS: dict[str, list[str]] = {
    "sports": [
        "match",
        "goalkeeper",
        "tournament",
        "referee",
        "stadium",
        "marathon",
        "penalty",
        "coach",
        "league",
        "sprint",
        "racket",
        "playoffs",
    ],
    "weather": [
        "forecast",
        "thunderstorm",
        "drizzle",
        "heatwave",
        "snowfall",
        "humidity",
        "breeze",
        "fog",
        "hailstorm",
        "rainbow",
        "frost",
        "monsoon",
    ],
    "food": [
        "recipe",
        "omelette",
        "bakery",
        "noodles",
        "dessert",
        "spices",
        "sandwich",
        "soup",
        "pastry",
        "barbecue",
        "salad",
        "dumplings",
    ],
    "music": [
        "concert",
        "guitar",
        "melody",
        "orchestra",
        "drummer",
        "album",
        "chorus",
        "violin",
        "playlist",
        "rehearsal",
        "lyrics",
        "piano",
    ],
    "travel": [
        "airport",
        "passport",
        "itinerary",
        "luggage",
        "hostel",
        "train ticket",
        "ferry",
        "souvenir",
        "boarding pass",
        "road trip",
        "visa",
        "suitcase",
    ],
    "science": [
        "experiment",
        "telescope",
        "molecule",
        "laboratory",
        "hypothesis",
        "microscope",
        "fossil",
        "equation",
        "genome",
        "satellite",
        "particle",
        "specimen",
    ],
}
SUBJECTS = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Goran",
    "Hana",
    "Ivo",
    "Jun",
    "Kemal",
    "Lena",
    "Mateo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "my aunt",
    "our neighbour",
    "the teacher",
    "a friend",
    "the new intern",
    "grandpa",
]
TEMPLATES = [
    "{s} could not stop talking about the {k} {d}.",
    "Yesterday {s} told everyone the {k} was {a}.",
    "Nobody expected the {k} to be so {a} {d}.",
    "{s} wrote a long post about the {k} {d}.",
    "I heard from {s} that the {k} felt {a}.",
    "The {k} {d} was {a}, according to {s}.",
    "{s} asked whether the {k} would be {a} {d}.",
    "Everyone agreed with {s}: the {k} was {a}.",
]
DETAILS = [
    "this morning",
    "last weekend",
    "on Friday",
    "after lunch",
    "in the evening",
    "this year",
    "at the weekend",
    "before dawn",
]
ADJECTIVES = [
    "surprising",
    "unforgettable",
    "disappointing",
    "remarkable",
    "strange",
    "wonderful",
    "exhausting",
    "calm",
    "chaotic",
    "brilliant",
]
INSTRUCTIONS = "Name the topic of the sentence (one of: {labels})."


def _rows(rng: random.Random, n: int, taken: set[str]) -> list[tuple[str, str]]:
    labels = sorted(TOPICS)
    rows: list[tuple[str, str]] = []
    while len(rows) < n:
        topic = labels[len(rows) % len(labels)]  # balanced classes
        sentence = rng.choice(TEMPLATES).format(
            s=rng.choice(SUBJECTS),
            k=rng.choice(TOPICS[topic]),
            d=rng.choice(DETAILS),
            a=rng.choice(ADJECTIVES),
        )
        sentence = sentence[0].upper() + sentence[1:]
        if sentence in taken:
            continue
        taken.add(sentence)
        rows.append((sentence, topic))
    return rows


def main() -> None:
    rng = random.Random(SEED)
    taken: set[str] = set()
    instruction = INSTRUCTIONS.format(labels=", ".join(sorted(TOPICS)))
    with open(HERE / "topics_chat.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for sentence, topic in _rows(rng, N_CHAT, taken):
            msgs = [
                {"role": "user", "content": f"{instruction}\n\n{sentence}"},
                {"role": "assistant", "content": topic},
            ]
            f.write(json.dumps({"messages": msgs}, ensure_ascii=False) + "\n")
    with open(HERE / "topics_alpaca.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for sentence, topic in _rows(rng, N_ALPACA, taken):
            row = {"instruction": instruction, "input": sentence, "output": topic}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
