"""Writes data/dialogsum_sample_{train,validation,test}.jsonl: short dialogues in DialogSum's format.

Fields as in DialogSum: ``id``, ``dialogue`` (turns ``#Person1#: ...`` joined by newlines),
``summary`` (third person, speakers named ``#Person1#``/``#Person2#``) and ``topic``.
The dialogues are written for this project from the scenarios below; run this file to regenerate.
"""

import json
import os
import random

SCENARIOS = [
    ("restaurant booking", [
        ("Good evening, I'd like to book a table for {n} on {day}.", "Certainly. What time would suit you?"),
        ("Around {time}, please. Could we sit by the window?", "Yes, a window table for {n} at {time} on {day} is reserved."),
    ], "#Person1# books a window table for {n} at {time} on {day}."),
    ("shopping", [
        ("Excuse me, do you have this {item} in {color}?", "Let me check. Yes, we have one {color} {item} left."),
        ("How much is it?", "It costs {price} dollars."),
        ("I'll take it.", "Great, you can pay at the front desk."),
    ], "#Person1# buys the last {color} {item} for {price} dollars."),
    ("directions", [
        ("Sorry to bother you, how do I get to the {place}?", "Go straight down {street} and turn left at the lights."),
        ("Is it far from here?", "No, it is about {minutes} minutes on foot."),
    ], "#Person2# tells #Person1# the {place} is {minutes} minutes away along {street}."),
    ("health", [
        ("Doctor, I've had a {symptom} since {day}.", "Have you taken any medicine for it?"),
        ("Only some tea with honey.", "Rest for a few days and come back if the {symptom} gets worse."),
    ], "#Person1# has had a {symptom} since {day} and the doctor advises rest."),
    ("job interview", [
        ("Thank you for coming. Why do you want to work here as a {job}?", "I have {years} years of experience and I like your team."),
        ("What is your greatest strength?", "I am patient and I learn quickly."),
    ], "#Person2# interviews for a {job} job and mentions {years} years of experience."),
    ("weekend plans", [
        ("What are you doing this weekend?", "I'm going {activity} at the {place2} with my sister."),
        ("That sounds fun. Can I join you?", "Of course, we leave on {day} morning."),
    ], "#Person2# invites #Person1# to go {activity} at the {place2} on {day}."),
    ("library", [
        ("I'd like to return this book, {book}.", "It is {late} days late, so there is a small fine."),
        ("I'm sorry, I forgot. How much do I owe?", "It's {fine} dollars. Please pay at the counter."),
    ], "#Person1# returns {book} {late} days late and pays a fine of {fine} dollars."),
    ("hotel", [
        ("Hello, I have a reservation under {name}.", "Welcome. A {room} room for {nights} nights, is that right?"),
        ("Yes. Is breakfast included?", "Breakfast is served from seven to ten in the lobby."),
    ], "{name} checks into a {room} room for {nights} nights; breakfast is included."),
    ("lost item", [
        ("I think I left my {item2} at the {place2} yesterday.", "What does it look like?"),
        ("It is {color} and quite small.", "Someone handed in a {color} {item2}. Here you are."),
    ], "#Person1# gets back the {color} {item2} lost at the {place2}."),
    ("birthday party", [
        ("{name} is having a birthday party on {day}. Are you coming?", "I'd love to. Where is it?"),
        ("At the {place2}, starting at {time}.", "I'll bring a cake."),
    ], "#Person1# invites #Person2# to {name}'s birthday party at the {place2} on {day}; #Person2# will bring a cake."),
    ("moving house", [
        ("We are moving to {city} next {month}.", "Really? Why {city}?"),
        ("My wife got a new job there as a {job}.", "I will miss you. Let me help you pack."),
    ], "#Person1# is moving to {city} in {month} because of a new job as a {job}; #Person2# offers to help."),
    ("taxi", [
        ("Can you take me to the {place}, please?", "Sure. Which entrance do you need?"),
        ("The main one. How long will it take?", "With this traffic, about {minutes} minutes."),
    ], "#Person1# takes a taxi to the {place}, a ride of about {minutes} minutes."),
]

SLOTS = {
    "n": ["two", "three", "four", "six", "five"],
    "day": ["Monday", "Tuesday", "Friday", "Saturday", "Sunday"],
    "time": ["seven", "eight", "half past six", "noon", "nine"],
    "item": ["jacket", "scarf", "sweater", "hat", "backpack"],
    "color": ["blue", "red", "green", "black", "yellow"],
    "price": ["forty", "twenty", "sixty", "fifteen", "thirty"],
    "place": ["train station", "museum", "city hospital", "post office", "airport"],
    "street": ["Oak Street", "the main road", "King Avenue", "River Lane", "Hill Road"],
    "minutes": ["ten", "five", "twenty", "fifteen", "twelve"],
    "symptom": ["headache", "cough", "sore throat", "fever", "backache"],
    "job": ["teacher", "nurse", "designer", "accountant", "driver"],
    "years": ["three", "five", "two", "seven", "ten"],
    "activity": ["hiking", "swimming", "fishing", "cycling", "skating"],
    "place2": ["park", "lake", "gym", "beach", "cafe"],
    "book": ["The Silent Sea", "Winter Roads", "A Small Garden", "The Last Map", "Old Bridges"],
    "late": ["three", "five", "two", "ten", "seven"],
    "fine": ["two", "four", "one", "six", "three"],
    "name": ["Mr. Smith", "Anna", "Tom", "Ms. Lee", "David"],
    "room": ["double", "single", "twin", "family", "quiet"],
    "nights": ["two", "three", "four", "five", "seven"],
    "item2": ["wallet", "umbrella", "phone", "key ring", "notebook"],
    "city": ["Boston", "Denver", "Seattle", "Chicago", "Austin"],
    "month": ["month", "spring", "summer", "winter", "autumn"],
}



def build(variant: int, scenario: int) -> dict:
    topic, turns, summary = SCENARIOS[scenario]
    slots = {k: v[(variant + scenario) % len(v)] for k, v in SLOTS.items()}
    lines = []
    for a, b in turns:
        lines.append("#Person1#: " + a.format(**slots))
        lines.append("#Person2#: " + b.format(**slots))
    return {"dialogue": "\n".join(lines), "summary": summary.format(**slots), "topic": topic}


def main(out_dir: str = os.path.dirname(os.path.abspath(__file__))) -> None:
    rows = {"train": [], "validation": [], "test": []}
    rng = random.Random(0)
    for s in range(len(SCENARIOS)):
        variants = list(range(5))
        rng.shuffle(variants)
        for k, v in enumerate(variants):
            split = "train" if k < 3 else ("validation" if k == 3 else "test")
            rows[split].append(build(v, s))
    for split, items in rows.items():
        path = os.path.join(out_dir, f"dialogsum_sample_{split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            for i, row in enumerate(items):
                f.write(json.dumps({"id": f"{split}_{i}", **row}) + "\n")


if __name__ == "__main__":
    main()
