"""Write ``alpaca_varlen.jsonl``: alpaca rows whose lengths vary the way instruction data does, deterministically.

Run ``python examples/data/bench/make_varlen_data.py``; it rewrites the file byte for byte the same every time.

The throughput benchmark (``benchmarks.throughput``) trains on it. What matters there is the length distribution, not
the text: real instruction sets (Alpaca, Dolly, OpenAssistant) are right-skewed, many short examples and a long
tail, so a batch padded to its longest member wastes a large share of its tokens. Each row's total length in
words is drawn from a log-normal (median 140 words, sigma 0.5) clipped to [62, 460] words; with the benchmark's
tokenizer that is about 100 to 600 tokens. The words come from small topic vocabularies put into sentence
templates, so a BPE tokenizer trained on the file maps most words to one token.

This folder is separate from ``examples/data`` on purpose: the demo tokenizer is trained on ``examples/data/*.jsonl``
and must not change when this file does.

Only the standard library is used, and the only randomness is ``random.Random(SEED)``.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

SEED = 0
ROWS = 600
HERE = Path(__file__).resolve().parent
OUT = HERE / "alpaca_varlen.jsonl"

MEDIAN_WORDS, SIGMA, MIN_WORDS, MAX_WORDS = 140, 0.5, 62, 460

TOPICS = {
    "rivers": ["water", "bank", "delta", "current", "valley", "flood", "bridge", "fish", "boat", "source"],
    "bread": ["flour", "yeast", "oven", "dough", "crust", "salt", "baker", "loaf", "grain", "butter"],
    "stars": ["light", "orbit", "planet", "telescope", "galaxy", "night", "comet", "moon", "dust", "gravity"],
    "forests": ["tree", "leaf", "root", "moss", "deer", "trail", "branch", "shade", "soil", "seed"],
    "trains": ["track", "station", "engine", "ticket", "platform", "signal", "carriage", "tunnel", "rail", "map"],
    "music": ["song", "drum", "piano", "rhythm", "voice", "string", "concert", "note", "melody", "choir"],
    "cities": ["street", "market", "square", "tower", "park", "harbour", "museum", "crowd", "lamp", "road"],
    "weather": ["rain", "cloud", "storm", "wind", "snow", "sun", "fog", "thunder", "season", "sky"],
}
ADJECTIVES = ["old", "quiet", "bright", "small", "large", "green", "cold", "warm", "busy", "slow", "deep", "clear"]
VERBS = ["moves", "changes", "grows", "carries", "holds", "turns", "follows", "meets", "shapes", "feeds"]
CONNECTORS = ["Then", "Later", "Often", "Sometimes", "In winter", "In summer", "At dawn", "By evening"]
INSTRUCTIONS = [
    "Write a short passage about {topic}.",
    "Describe {topic} in a few paragraphs.",
    "Explain how {topic} work, in plain words.",
    "Tell a story in which {topic} matter.",
    "Summarize the following notes about {topic}.",
    "Rewrite the text below about {topic} more clearly.",
]


def sentence(rng: random.Random, words: list[str]) -> str:
    a, b = rng.sample(words, 2)
    adj, verb = rng.choice(ADJECTIVES), rng.choice(VERBS)
    opener = rng.choice(CONNECTORS) + ", the" if rng.random() < 0.3 else "The"
    return f"{opener} {adj} {a} {verb} the {b}."


def text_of(rng: random.Random, words: list[str], count: int) -> str:
    """Sentences until about ``count`` words."""
    out: list[str] = []
    n = 0
    while n < count:
        s = sentence(rng, words)
        out.append(s)
        n += len(s.split())
    return " ".join(out)


def row(rng: random.Random) -> dict[str, str]:
    topic = rng.choice(sorted(TOPICS))
    words = TOPICS[topic]
    template = rng.choice(INSTRUCTIONS)
    instruction = template.format(topic=topic)
    total = round(min(MAX_WORDS, max(MIN_WORDS, rng.lognormvariate(math.log(MEDIAN_WORDS), SIGMA))))
    budget = total - len(instruction.split())
    needs_input = template.startswith(("Summarize", "Rewrite"))
    input_words = round(budget * rng.uniform(0.4, 0.6)) if needs_input else 0
    return {
        "instruction": instruction,
        "input": text_of(rng, words, input_words) if input_words else "",
        "output": text_of(rng, words, budget - input_words),
    }


def main() -> None:
    rng = random.Random(SEED)
    rows = [row(rng) for _ in range(ROWS)]
    OUT.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {OUT}")


if __name__ == "__main__":
    main()
