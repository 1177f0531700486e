"""Write the small example inputs of configs/data/example.yaml under configs/data/example/ (seeded, no download).

Prose is generated from a small grammar, with planted problems so that each filter has something to do:
exact copies (case and spacing changed), lightly edited copies, gibberish, blocklisted words, too-short
documents and one malformed JSONL line.   python scripts/make_example_data.py [--out configs/data/example]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

SUBJECTS = ("the river", "a young engineer", "the old library", "our small village", "the committee",
            "a tired traveller", "the northern forest", "the new bridge", "her grandfather", "the orchestra",
            "a curious student", "the harbour master", "the research group", "a quiet neighbour", "the city council",
            "the mountain road")
VERBS = ("described", "changed", "remembered", "protected", "questioned", "measured", "carried", "explained",
         "discovered", "rebuilt", "ignored", "celebrated", "studied", "followed", "painted", "announced")
OBJECTS = ("the long winter", "a forgotten map", "the price of bread", "the first harvest", "an unusual letter",
           "the rules of the game", "a cheaper method", "the broken clock", "the history of the town",
           "a set of old photographs", "the evening train", "the results of the survey", "a secret garden",
           "the shape of the coast", "the cost of repairs", "the sound of the bells")
ENDINGS = ("before anyone noticed", "with great care", "for the second time", "in the early morning",
           "after a long debate", "without much help", "as the rain began", "during the summer fair",
           "in front of the school", "while the others slept", "at the end of the year", "with some hesitation")
LINKS = ("Later,", "Meanwhile,", "In the end,", "At first,", "Still,", "Of course,", "Even so,", "Soon after,")


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)}."
    if rng.random() < 0.4:
        s = f"{rng.choice(LINKS)} {s}"
    return s[0].upper() + s[1:]


def document(rng: random.Random, sentences: int) -> str:
    paragraphs = []
    while sentences > 0:
        n = min(sentences, rng.randint(3, 6))
        paragraphs.append(" ".join(sentence(rng) for _ in range(n)))
        sentences -= n
    return "\n\n".join(paragraphs)


def edit_lightly(rng: random.Random, text: str) -> str:
    words = text.split(" ")
    i = rng.randrange(len(words))
    words[i] = rng.choice(("remarkably", "quietly", "also"))
    return " ".join(words)


def planted(rng: random.Random, docs: list[str]) -> list[str]:
    """Copies, light edits, gibberish, blocklisted and short documents, to be removed by the build."""
    bad = [docs[i].upper().replace(" ", "  ") for i in range(3)]  # exact duplicates after normalising
    bad += [edit_lightly(rng, docs[i]) for i in range(3, 6)]  # near duplicates
    bad += ["%%$$ ## {{}} <<>> || " * 20, "zxq vbn qwp lkj " * 30, "click here\n" * 40]  # gibberish
    bad += [docs[6] + " Buy cheap casinopills today."]  # blocklist
    bad += ["Too short.", "ok"]
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="configs/data/example")
    out = Path(parser.parse_args().out)
    rng = random.Random(0)
    (out / "books").mkdir(parents=True, exist_ok=True)
    web = [document(rng, rng.randint(4, 12)) for _ in range(120)]
    web_all = web + planted(rng, web)
    rng.shuffle(web_all)
    with (out / "web.jsonl").open("w") as f:
        for i, text in enumerate(web_all):
            f.write(json.dumps({"url": f"https://example.com/{i}", "text": text}) + "\n")
            if i == 50:
                f.write('{"url": "https://example.com/broken", "text": "unterminated\n')  # malformed on purpose
    for i in range(12):
        (out / "books" / f"book{i:02d}.txt").write_text(document(rng, rng.randint(30, 60)) + "\n")
    with (out / "academic.jsonl").open("w") as f:
        for i in range(40):
            f.write(json.dumps({"id": i, "abstract": document(rng, rng.randint(4, 8))}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    wiki = [document(rng, rng.randint(5, 10)) for _ in range(60)]
    pq.write_table(pa.table({"title": [f"Article {i}" for i in range(60)], "text": wiki}), out / "wiki.parquet")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
