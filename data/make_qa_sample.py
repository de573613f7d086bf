"""Writes data/qa_sample.jsonl: short question/context/answer triples for the tiny T5 recipe.

Columns: ``id``, ``context``, ``question``, ``answers`` (a list of acceptable answer texts, each a
span of the context). The facts are invented from the tables below for this project; a few
contexts carry extra spaces and line breaks (cleaned by the script, as S004 does). Run this file
to regenerate.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

PEOPLE = ["Mara Velt", "Tobias Reen", "Ilse Moran", "Kofi Adjei", "Lena Sorr", "Pavel Dunin", "Aiko Tanabe",
          "Rui Castro", "Nadia Ferhat", "Owen Pryce"]
CITIES = ["Lisbon", "Tampere", "Accra", "Kraków", "Osaka", "Valparaíso", "Ghent", "Tbilisi", "Perth", "Bergen"]
JOBS = ["baker", "pilot", "chemist", "carpenter", "librarian", "nurse", "architect", "violinist"]
RIVERS = ["Sorell", "Amberlin", "Kesta", "Mowbry", "Tallis"]
SEAS = ["North Sea", "Red Sea", "Coral Sea", "Black Sea", "Irish Sea"]
DEVICES = ["folding kettle", "tide clock", "paper lantern press", "bicycle lamp", "rain gauge", "seed drill",
           "pocket loom", "glass harp"]


def a_or_an(word):
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def people(rng):
    rows = []
    for name in PEOPLE:
        born, moved = rng.sample(CITIES, 2)
        year, job = rng.randint(1900, 1999), rng.choice(JOBS)
        context = (f"{name} was born in {born} in {year}. After school, {name.split()[0]} trained as {a_or_an(job)} "
                   f"and  later moved to {moved}, where the family still lives.")
        rows += [(context, f"Where was {name} born?", [born]),
                 (context, f"In which year was {name} born?", [str(year)]),
                 (context, f"What did {name} train as?", [job, a_or_an(job)]),
                 (context, f"Where did {name} move to?", [moved])]
    return rows


def rivers(rng):
    rows = []
    for river in RIVERS:
        country, sea, length = rng.choice(CITIES), rng.choice(SEAS), rng.randint(40, 900)
        context = (f"The {river} river rises in the hills north of {country}.\nIt runs for {length} kilometres "
                   f"and ends in the {sea}.")
        rows += [(context, f"How long is the {river} river?", [f"{length} kilometres", str(length)]),
                 (context, f"Where does the {river} river end?", [f"the {sea}", sea]),
                 (context, f"Near which city does the {river} river rise?", [country])]
    return rows


def devices(rng):
    rows = []
    for device in DEVICES:
        inventor, city, year = rng.choice(PEOPLE), rng.choice(CITIES), rng.randint(1700, 1950)
        context = f"The {device} was  invented in {year} by {inventor}, who ran a small workshop in {city}."
        rows += [(context, f"Who invented the {device}?", [inventor]),
                 (context, f"When was the {device} invented?", [str(year), f"in {year}"]),
                 (context, f"In which city was the {device} invented?", [city])]
    return rows


def main(out_dir: str = HERE):
    rng = random.Random(101)
    rows = people(rng) + rivers(rng) + devices(rng)
    rng.shuffle(rows)
    with open(os.path.join(out_dir, "qa_sample.jsonl"), "w", encoding="utf-8") as f:
        for i, (context, question, answers) in enumerate(rows):
            assert all(a in context for a in answers), (context, answers)
            f.write(json.dumps({"id": f"qa_{i}", "context": context, "question": question, "answers": answers},
                               ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
