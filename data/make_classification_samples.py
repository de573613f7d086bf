"""Writes the classification samples the tiny recipes and the tests use, in the real corpora's formats.

- ``spam_sample.tsv``: the UCI SMS Spam Collection's format, ``label<TAB>text``, no header, labels
  ``ham``/``spam``, more ham than spam (so balancing has work to do).
- ``imdb_sample.csv``: IMDB's columns ``text,label`` (1 positive, 0 negative); reviews with commas and
  quoted passages, so the CSV needs its quoting.
- ``mrpc_sample.tsv``: GLUE MRPC's columns ``Quality, #1 ID, #2 ID, #1 String, #2 String`` (1 when the
  second sentence is a paraphrase of the first).

Texts are generated from the templates below (written for this project) and contain stray,
unbalanced double quotes as the real TSV files do, which a quoting CSV reader would merge into one
field. The classes are separable by their words so that a tiny model learns them in seconds.
Run this file to regenerate.
"""

import csv
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
PLACES = ["the station", "the gym", "home", "the office", "the cafe", "school", "the market"]
TIMES = ["at 6", "tonight", "after lunch", "tomorrow", "in ten minutes", "on Sunday", "before 9"]


def spam_rows(rng):
    ham = [
        "Hey {n}, are we still meeting {t} at {p}?",
        "Running late, see you {t}. Sorry!",
        "Can you pick up milk on the way {p}?",
        "Ok lor. I'll call you when I reach {p}.",
        "Thanks for dinner yesterday, it was lovely.",
        "Did {n} say \"yes\" about the trip {t}?",
        "I'm at {p} now, where are u?",
        "Mum says hi. Come {p} {t} if you can.",
        "\"Ok lor\" he said, so see you {t}.",
        "Tell {n} I said \"see you at {p} :)",
    ]
    spam = [
        "WINNER!! You have won a FREE prize worth $1000. Call 0800{d} now to claim!",
        "URGENT: your mobile number was selected for a cash AWARD. Text CLAIM to 8{d}.",
        "Free entry in our weekly draw! Txt WIN to 8{d} to receive your \"bonus\" ringtone.",
        "Congratulations! Claim your FREE holiday voucher today, call 0900{d}. T&Cs apply.",
        "You have been chosen for a guaranteed £500 CASH reward! Reply CLAIM now, 18+ only.",
        "\"FREE\" msg: claim your PRIZE now, txt WIN to 8{d} (£1.50/msg)",
    ]
    rows = []
    for i in range(90):
        rows.append(("ham", rng.choice(ham).format(n=rng.choice(NAMES), t=rng.choice(TIMES), p=rng.choice(PLACES))))
    for i in range(30):
        rows.append(("spam", rng.choice(spam).format(d=rng.randrange(1000, 9999))))
    rng.shuffle(rows)
    return rows


def imdb_rows(rng):
    good = ["wonderful", "brilliant", "moving", "a delight", "superb", "beautifully shot", "funny and warm"]
    bad = ["boring", "a mess", "awful", "painfully slow", "badly acted", "a waste of time", "dull, dull, dull"]
    subjects = ["The plot", "The acting", "The soundtrack", "This sequel", "The ending", "The director's cut"]
    rows = []
    for i in range(100):
        positive = i % 2 == 0
        words = good if positive else bad
        parts = [f"{rng.choice(subjects)} is {rng.choice(words)}.",
                 f"My friend called it \"{rng.choice(words)}\", and I agree.",
                 f"{'I loved it' if positive else 'I hated it'}, {rng.choice(['honestly', 'really', 'truly'])}."]
        rng.shuffle(parts)
        rows.append((" ".join(parts[: rng.randint(2, 3)]), 1 if positive else 0))
    return rows


def mrpc_rows(rng):
    events = [
        ("{n} said the company would hire {k} workers {t}.", "The company will hire {k} workers {t}, {n} said.",
         "{n} denied that the company would ever cut jobs."),
        ("Shares rose {k} percent {t} after the report.", "After the report, shares gained {k} percent {t}.",
         "The report was delayed and no trading took place."),
        ("Police said {k} people were hurt at {p}.", "{k} people were injured at {p}, police said.",
         "Officials refused to comment on the weather at {p}."),
        ("The council approved the \"new park plan {t}.", "{t}, the council voted to approve the new park plan.",
         "Residents never heard about the budget meeting."),
    ]
    rows = []
    for i in range(100):
        first, same, other = rng.choice(events)
        fill = dict(n=rng.choice(NAMES), k=rng.randint(2, 90), t=rng.choice(TIMES), p=rng.choice(PLACES))
        label = i % 3 != 0  # about two thirds paraphrases, as in MRPC
        rows.append((int(label), 1000 + 2 * i, 1001 + 2 * i, first.format(**fill),
                     (same if label else other).format(**fill)))
    return rows


def main(out_dir: str = HERE):
    rng = random.Random(2024)
    with open(os.path.join(out_dir, "spam_sample.tsv"), "w", encoding="utf-8") as f:
        for label, text in spam_rows(rng):
            f.write(f"{label}\t{text}\n")
    with open(os.path.join(out_dir, "imdb_sample.csv"), "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(imdb_rows(rng))
    with open(os.path.join(out_dir, "mrpc_sample.tsv"), "w", encoding="utf-8") as f:
        f.write("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n")
        for row in mrpc_rows(rng):
            f.write("\t".join(str(v) for v in row) + "\n")


if __name__ == "__main__":
    main()
