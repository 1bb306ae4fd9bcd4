"""Write the small demo data sets in this folder, deterministically.

Run ``python examples/data/make_demo_data.py`` from anywhere; it rewrites, byte for byte the same every time:

- ``alpaca_demo.jsonl``: templated instruction/input/output tasks (capitals, colours in French, opposites,
  animal sounds, sums of small numbers, first letters). The tasks are deliberately repetitive and use a small
  vocabulary so that a 2-layer model with a few thousand parameters per layer visibly learns them in ~60
  optimizer steps on a CPU and then answers a training prompt recognisably.
- ``chat_demo.jsonl``: ``messages`` conversations (some with a system turn, some multi-turn).
- ``text_demo.jsonl``: plain ``text`` rows.
- ``completion_demo.jsonl``: ``prompt``/``completion`` rows.

All four are built from the same fact tables, so one tokenizer trained on them covers every format.
Only the standard library is used, and the only randomness is ``random.Random(SEED)``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SEED = 0
HERE = Path(__file__).resolve().parent

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Ireland": "Dublin",
    "Egypt": "Cairo",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "Delhi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Canada": "Ottawa",
    "Kenya": "Nairobi",
    "Russia": "Moscow",
    "Turkey": "Ankara",
    "Cuba": "Havana",
}

COLOURS_FR = {
    "red": "rouge",
    "blue": "bleu",
    "green": "vert",
    "yellow": "jaune",
    "black": "noir",
    "white": "blanc",
    "pink": "rose",
    "grey": "gris",
    "orange": "orange",
    "purple": "violet",
}

OPPOSITES = {
    "hot": "cold",
    "big": "small",
    "fast": "slow",
    "up": "down",
    "day": "night",
    "old": "new",
    "happy": "sad",
    "open": "closed",
    "light": "dark",
    "early": "late",
    "full": "empty",
    "high": "low",
    "wet": "dry",
    "hard": "soft",
    "strong": "weak",
    "left": "right",
}

ANIMAL_SOUNDS = {
    "cow": "moo",
    "dog": "woof",
    "cat": "meow",
    "duck": "quack",
    "sheep": "baa",
    "pig": "oink",
    "owl": "hoot",
    "horse": "neigh",
    "lion": "roar",
    "snake": "hiss",
    "bee": "buzz",
    "frog": "croak",
}

WORDS = [
    "apple",
    "banana",
    "cherry",
    "garden",
    "window",
    "river",
    "mountain",
    "pencil",
    "orange",
    "yellow",
    "tiger",
    "lemon",
    "house",
    "zebra",
    "violin",
    "kettle",
]

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def alpaca_rows() -> list[dict[str, str]]:
    """Templated alpaca rows: a few phrasings per fact so the model sees the same answer asked differently."""
    rows: list[dict[str, str]] = []

    def add(instruction: str, output: str, input: str = "") -> None:
        rows.append({"instruction": instruction, "input": input, "output": output})

    for country, city in CAPITALS.items():
        add(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
        add(f"Name the capital city of {country}.", f"The capital of {country} is {city}.")
        add("Which city is the capital of this country?", f"The capital of {country} is {city}.", input=country)
        add(f"Tell me the capital of {country}.", f"The capital of {country} is {city}.")
    for colour, french in COLOURS_FR.items():
        add(f"Translate the colour {colour} to French.", f"In French, {colour} is {french}.")
        add(f"How do you say {colour} in French?", f"In French, {colour} is {french}.")
        add("Translate this colour to French.", f"In French, {colour} is {french}.", input=colour)
        add(f"What is {colour} in French?", f"In French, {colour} is {french}.")
    for word, opposite in OPPOSITES.items():
        add(f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.")
        add("Give the opposite of this word.", f"The opposite of {word} is {opposite}.", input=word)
        add(f"What is the opposite of {opposite}?", f"The opposite of {opposite} is {word}.")
    for animal, sound in ANIMAL_SOUNDS.items():
        add(f"What sound does a {animal} make?", f"A {animal} says {sound}.")
        add("What sound does this animal make?", f"A {animal} says {sound}.", input=animal)
        add(f"Tell me the sound a {animal} makes.", f"A {animal} says {sound}.")
    for a in range(10):
        for b in range(10):
            add(f"Add {a} and {b}.", f"{a} plus {b} is {a + b}.")
    for word in WORDS:
        add("What is the first letter of this word?", f"The first letter of {word} is {word[0]}.", input=word)
        add(f"What is the first letter of the word {word}?", f"The first letter of {word} is {word[0]}.")
    random.Random(SEED).shuffle(rows)
    return rows


def chat_rows() -> list[dict[str, list[dict[str, str]]]]:
    """Conversations: single-turn, with a system prompt, and two-exchange ones."""
    rng = random.Random(SEED + 1)
    rows = []
    systems = ["You are a helpful assistant.", "You answer in one short sentence."]
    for i, (country, city) in enumerate(CAPITALS.items()):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": systems[i % 2]})
        msgs.append({"role": "user", "content": f"What is the capital of {country}?"})
        msgs.append({"role": "assistant", "content": f"The capital of {country} is {city}."})
        if i % 2 == 0:
            animal, sound = list(ANIMAL_SOUNDS.items())[i % len(ANIMAL_SOUNDS)]
            msgs.append({"role": "user", "content": f"And what sound does a {animal} make?"})
            msgs.append({"role": "assistant", "content": f"A {animal} says {sound}."})
        rows.append({"messages": msgs})
    for colour, french in COLOURS_FR.items():
        rows.append(
            {
                "messages": [
                    {"role": "system", "content": systems[0]},
                    {"role": "user", "content": f"How do you say {colour} in French?"},
                    {"role": "assistant", "content": f"In French, {colour} is {french}."},
                ]
            }
        )
    for word, opposite in list(OPPOSITES.items())[:8]:
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"What is the opposite of {word}?"},
                    {"role": "assistant", "content": f"The opposite of {word} is {opposite}."},
                    {"role": "user", "content": "Thanks!"},
                    {"role": "assistant", "content": "You are welcome."},
                ]
            }
        )
    rng.shuffle(rows)
    return rows


def text_rows() -> list[dict[str, str]]:
    rows = [{"text": f"{city} is the capital of {country}."} for country, city in CAPITALS.items()]
    rows += [
        {"text": f"The {animal} says {sound}. Everyone knows the {animal}."} for animal, sound in ANIMAL_SOUNDS.items()
    ]
    rows += [{"text": f"The colour {c} is called {f} in French."} for c, f in COLOURS_FR.items()]
    random.Random(SEED + 2).shuffle(rows)
    return rows


def completion_rows() -> list[dict[str, str]]:
    rows = [{"prompt": f"The capital of {country} is", "completion": f" {city}."} for country, city in CAPITALS.items()]
    rows += [{"prompt": f"The opposite of {w} is", "completion": f" {o}."} for w, o in OPPOSITES.items()]
    rows += [
        {"prompt": f"{NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]} is", "completion": f" {NUMBER_WORDS[a + b]}."}
        for a in range(1, 5)
        for b in range(1, 5)
        if a + b <= 10
    ]
    random.Random(SEED + 3).shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    # One JSON object per line, keys in a fixed order, plain UTF-8: diffs stay readable and bytes stable.
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    outputs = {
        "alpaca_demo.jsonl": alpaca_rows(),
        "chat_demo.jsonl": chat_rows(),
        "text_demo.jsonl": text_rows(),
        "completion_demo.jsonl": completion_rows(),
    }
    for name, rows in outputs.items():
        write_jsonl(HERE / name, rows)
        print(f"wrote {len(rows):4d} rows to {HERE / name}")


if __name__ == "__main__":
    main()
