"""Regenerate ``fedtune/data/files/tiny_topics.jsonl``: 480 short sentences in 4 topics.

The file is committed; this script documents how it was made (seeded, deterministic).
Each sentence mixes two topic words with shared filler words, so a small randomly
initialised model can learn the task in a few federated rounds, but not trivially.
"""

import json
import random
from pathlib import Path

TOPICS = {
    "sports": ["football", "match", "goal", "team", "coach", "league", "player", "score", "tennis", "race"],
    "technology": ["computer", "software", "chip", "robot", "internet", "code", "laptop", "server", "phone", "data"],
    "food": ["pizza", "bread", "cheese", "soup", "recipe", "kitchen", "salad", "dinner", "fruit", "cake"],
    "weather": ["rain", "storm", "sunny", "wind", "snow", "cloud", "forecast", "cold", "thunder", "fog"],
}
FILLER = ["the", "a", "today", "new", "big", "people", "said", "about", "again", "very", "this", "week",
          "city", "news", "talk", "report", "good", "bad", "many", "after"]
TEMPLATES = [
    "{f1} {t1} {f2} {t2}", "{t1} {f1} {f2} {t2} {f3}", "{f1} {f2} {t1} {f3} {t2}",
    "{t1} and {t2} {f1}", "{f1} {t1} {f2} {f3} {t2} {f4}",
]


def make_rows(per_topic: int = 120, seed: int = 7) -> list[dict[str, str]]:
    """``4 · per_topic`` labelled sentences, shuffled; the same for the same arguments."""
    rng = random.Random(seed)
    rows = []
    for topic, words in TOPICS.items():
        for _ in range(per_topic):
            t1, t2 = rng.sample(words, 2)
            f1, f2, f3, f4 = (rng.choice(FILLER) for _ in range(4))
            rows.append({"text": rng.choice(TEMPLATES).format(t1=t1, t2=t2, f1=f1, f2=f2, f3=f3, f4=f4),
                         "label": topic})
    rng.shuffle(rows)
    return rows


def main() -> None:
    rows = make_rows()
    # JSON Lines, not CSV: Flower app bundles (FABs) carry only .py/.toml/.md/.yaml/.json(l)
    out = Path(__file__).resolve().parent.parent / "fedtune" / "data" / "files" / "tiny_topics.jsonl"
    with open(out, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
