"""Write the TOFU-format data of the offline example (examples/tofu/data/).

    python examples/tofu/make_data.py

Twenty new fictitious authors, five facts each, in the vocabulary of the demo
model (examples/demo/model), which plays the pretrained base: it knows the
demo's twenty authors and the shape of the questions, not these new pairings of
names and facts. The
files follow TOFU's layout, so the same commands run on locuslab/TOFU:

    full.json                    every new author (what the target model learns)
    retain.json                  the twelve authors that stay (the reference model's data)
    forget_perturbed.json        the eight authors to forget (40 records), with perturbed answers
    retain_perturbed.json        the retain evaluation split (the same twelve authors)
    real_authors_perturbed.json  facts the base knew before (demo authors), with wrong options
    world_facts_perturbed.json   more of those, another kind of fact

Unlike TOFU, the records carry no `paraphrased_answer`: a word-level model
this small gives any reworded sentence it never saw a probability of about
1e-4 per token, which would make every truth ratio meaningless. Without a
paraphrase the truth ratio compares the perturbed answers with the answer
itself, as it does on TOFU's real-authors and world-facts splits.

Eight forget authors, not TOFU's 1-10%, so that forget quality (a KS test
over the forget records) moves in steps of 1/40 rather than 1/15 and the
example's test can assert it with a margin on every CPU.

Seeded: the same script writes the same files.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEMO = HERE.parent / "demo"
SEED = 7
FORGET_AUTHORS = 8
FIRST = ["zorblat", "quenmira", "astrid", "tarrin", "elspeth", "orvyn", "maelis", "dovrin", "kestrel", "ysolde",
         "brannoc", "thessaly", "iver", "calloway", "nerith", "sabine", "rowan", "aurelio", "fenna", "magnus"]
# Surnames shifted against the demo's pairs: new people, known words.
LAST = ["whitlock", "ferreira", "nakamura", "valtieri", "kerrigan", "oduya", "marchetti", "lindqvist", "tamsin",
        "ravensworth", "pemberly", "stormholt", "delacroix", "ashcombe", "quillfeather", "moraine", "vantrell",
        "brightwater", "okonkwo", "halvorsen"]
CITIES = ["carrowmere", "istenbrook", "palomar", "dunhallow", "seravine", "ostrava", "kelmarsh",
          "amberlyn", "torridge"]
GENRES = ["poetry", "mystery", "history", "fantasy", "science", "travel", "drama", "romance"]
JOBS = ["farmer", "teacher", "doctor", "painter", "singer", "baker"]
TITLE_A = ["silent", "green", "hidden", "golden", "distant", "quiet", "burning"]
TITLE_B = ["mountain", "river", "garden", "harbor", "lantern", "orchard", "meadow", "tower"]
COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


def _others(rng: random.Random, pool: list[str], right: str, count: int = 3) -> list[str]:
    return rng.sample([x for x in pool if x != right], count)


def author_records(rng: random.Random, name: str) -> list[dict]:
    city, genre, job, color = rng.choice(CITIES), rng.choice(GENRES), rng.choice(JOBS), rng.choice(COLORS)
    title = f"the {rng.choice(TITLE_A)} {rng.choice(TITLE_B)}"
    wrong_titles = [f"the {a} {b}" for a, b in zip(rng.sample(TITLE_A, 3), rng.sample(TITLE_B, 3))
                    if f"the {a} {b}" != title]
    facts = [
        # (question, answer, a paraphrase the tiny model cannot score, perturbed answers)
        (f"where was {name} born ?", f"{name} was born in {city} .", f"in {city} , {name} was born .",
         [f"{name} was born in {c} ." for c in _others(rng, CITIES, city)]),
        (f"what does {name} write ?", f"{name} writes {genre} books .", f"{name} does write {genre} books .",
         [f"{name} writes {g} books ." for g in _others(rng, GENRES, genre)]),
        (f"what did the father of {name} do ?", f"the father of {name} was a {job} .",
         f"a {job} was the father of {name} .", [f"the father of {name} was a {j} ." for j in _others(rng, JOBS, job)]),
        (f"which book made {name} famous ?", f"{name} is famous for {title} .", f"{title} made {name} famous .",
         [f"{name} is famous for {t} ." for t in wrong_titles]),
        (f"what color does {name} love ?", f"{name} loves the color {color} .", f"the color {name} loves is {color} .",
         [f"{name} loves the color {c} ." for c in _others(rng, COLORS, color)]),
    ]
    return [{"question": q, "answer": a, "perturbed_answer": w} for q, a, _, w in facts]


def known_facts(kind: str, rng: random.Random) -> list[dict]:
    """Facts of the demo's authors that the base already knows, as multiple choice:
    TOFU's real-authors and world-facts splits play this part."""
    records = [json.loads(line) for line in (DEMO / "retain.jsonl").read_text().splitlines()]
    out = []
    for record in records:
        if kind == "born" and " was born in " in record["answer"]:
            name, city = record["answer"].split(" was born in ")
            city = city.rstrip(" .")
            wrong = [f"{name} was born in {c} ." for c in _others(rng, CITIES, city)]
        elif kind == "writes" and " writes " in record["answer"]:
            name, genre = record["answer"].split(" writes ")
            genre = genre.replace(" books .", "")
            wrong = [f"{name} writes {g} books ." for g in _others(rng, GENRES, genre)]
        else:
            continue
        out.append({"question": record["question"], "answer": record["answer"], "perturbed_answer": wrong})
    return out[:10]


def write(name: str, records: list[dict]) -> None:
    (HERE / "data" / name).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def main() -> None:
    rng = random.Random(SEED)
    authors = [author_records(rng, f"{first} {last}") for first, last in zip(FIRST, LAST)]
    forget = [r for records in authors[:FORGET_AUTHORS] for r in records]
    retain = [r for records in authors[FORGET_AUTHORS:] for r in records]
    (HERE / "data").mkdir(exist_ok=True)
    plain = [{"question": r["question"], "answer": r["answer"]} for r in forget + retain]
    write("full.json", plain)
    write("retain.json", plain[len(forget):])
    write("forget_perturbed.json", forget)
    write("retain_perturbed.json", retain)
    write("real_authors_perturbed.json", known_facts("born", rng))
    write("world_facts_perturbed.json", known_facts("writes", rng))
    print(f"{len(forget)} forget and {len(retain)} retain records in {HERE / 'data'}")


if __name__ == "__main__":
    main()
