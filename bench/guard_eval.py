#!/usr/bin/env python3
"""Precision and recall of pii-guard's recognizers on a labelled corpus, next to presidio-analyzer
on the same texts, with the speed of both.

The corpus is generated with `faker` (seeded, so every run sees the same texts): realistic
sentences with one embedded value of every supported kind, written the ways people write them,
plus hard negatives that look like PII and are not (order and tracking numbers, timestamps,
dates, version strings, prices, UUIDs, MAC addresses, numbers that fail Luhn or mod-97, SSNs
from never-issued ranges). A finding counts as correct when a gold value of the same entity
overlaps it. Presidio runs its pattern recognizers (no NER model can be downloaded here) at its
default score threshold; it has no recognizer for secrets.

Usage: bench/guard_eval.sh (creates target/eval-venv with faker and presidio-analyzer).
Writes bench/results/guard_eval.md and prints it.
"""
import base64
import json
import os
import random
import string
import subprocess
import sys
import time
from pathlib import Path

from faker import Faker

import pii_corpus

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "guard_eval.md"
# PII_SCAN points at another build (the one before a change, to compare); NO_PRESIDIO=1 skips it.
SCANNER = Path(os.environ.get("PII_SCAN", ROOT / "target" / "release" / "examples" / "pii_scan"))
PER_ENTITY = 400
NEGATIVES = 1200
ENTITIES = ["email", "phone", "credit_card", "us_ssn", "iban", "ip_address", "secret"]
PRESIDIO = {"EMAIL_ADDRESS": "email", "PHONE_NUMBER": "phone", "CREDIT_CARD": "credit_card", "US_SSN": "us_ssn",
            "IBAN_CODE": "iban", "IP_ADDRESS": "ip_address"}

rng = random.Random()
fake = Faker("en_US")
fake_eu = Faker(["en_GB", "de_DE", "fr_FR", "nl_NL", "es_ES", "it_IT"])
# The recognizers were tuned looking at the misses of seed 7; seed 2026 was never looked at.
SEEDS = [(7, "tuning corpus"), (2026, "held-out corpus")]
# The classes corpus (bench/pii_corpus.py, issue 18): tuned on seed 11, measured on 2027.
CLASS_SEEDS = [(11, "classes corpus, tuning"), (2027, "classes corpus, held out")]

TEMPLATES = [
    "Please contact me at {v} tomorrow.",
    "My {label} is {v}.",
    "{v}",
    "Hi, {name} here. You can reach me via {v} if anything changes.",
    "Update the record for {name}: {label} {v}, effective immediately.",
    "Can you check why {v} was flagged in yesterday's report?",
    "I wrote it down as {v} - is that right?",
    "{name} ({v}) asked about the invoice from March.",
]
LABELS = {"email": "email", "phone": "phone number", "credit_card": "card number", "us_ssn": "SSN",
          "iban": "IBAN", "ip_address": "server IP", "secret": "API key"}


def rand(chars, n):
    return "".join(rng.choice(chars) for _ in range(n))


def phone():
    kind = rng.random()
    if kind < 0.6:
        return fake.phone_number()
    if kind < 0.8:
        return fake_eu.phone_number()
    return rng.choice(["+1415{}", "+4420{}", "+49 30 {}"]).format(rand(string.digits, 7))


def credit_card():
    number = fake.credit_card_number(card_type=rng.choice(
        ["visa16", "visa13", "mastercard", "amex", "discover", "jcb16", "diners"]))
    if len(number) == 16 and rng.random() < 0.5:
        sep = rng.choice([" ", "-"])
        number = sep.join(number[i:i + 4] for i in range(0, 16, 4))
    return number


def iban():
    value = fake_eu.iban()
    if rng.random() < 0.5:
        value = " ".join(value[i:i + 4] for i in range(0, len(value), 4))
    return value


def ip_address():
    return rng.choice([fake.ipv4, fake.ipv4_private, fake.ipv6])()


def jwt():
    def part(obj):
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return ".".join([part({"alg": "HS256", "typ": "JWT"}), part({"sub": str(rng.randint(1, 10**9)),
                                                                 "name": fake.name()}),
                     rand(string.ascii_letters + string.digits + "-_", 43)])


def secret():
    alnum = string.ascii_letters + string.digits
    kind = rng.randrange(8)
    if kind == 0:
        return "AKIA" + rand(string.ascii_uppercase + string.digits, 16)
    if kind == 1:
        return "sk-proj-" + rand(alnum + "-_", 48)
    if kind == 2:
        return "sk-ant-api03-" + rand(alnum + "-_", 40)
    if kind == 3:
        return rng.choice(["ghp_", "gho_", "ghs_"]) + rand(alnum, 36)
    if kind == 4:
        return "xoxb-" + rand(string.digits, 12) + "-" + rand(alnum, 24)
    if kind == 5:
        return "AIza" + rand(alnum + "-_", 35)
    if kind == 6:
        return jwt()
    body = "\n".join(rand(alnum + "+/", 64) for _ in range(4))
    return f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"


GENERATORS = {"email": lambda: rng.choice([fake.email, fake.free_email, fake.company_email])(),
              "phone": phone, "credit_card": credit_card, "us_ssn": fake.ssn, "iban": iban,
              "ip_address": ip_address, "secret": secret}




def hard_negative():
    kind = rng.randrange(14)
    if kind == 0:
        return f"Order #{rng.randint(10**7, 10**8 - 1)} shipped on {fake.date()}."
    if kind == 1:
        return f"The job finished at {fake.date_time().isoformat()}Z after {rng.randint(2, 99)} retries."
    if kind == 2:
        return f"Upgrade to v{rng.randint(1, 20)}.{rng.randint(0, 30)}.{rng.randint(0, 99)} before {fake.date()}."
    if kind == 3:
        while True:  # 16 digits that fail Luhn, grouped like a card
            digits = "4" + rand(string.digits, 15)
            if not pii_corpus.luhn_ok(digits):
                break
        return f"Reference {' '.join(digits[i:i + 4] for i in range(0, 16, 4))} is not a card."
    if kind == 4:
        return pii_corpus.failed_iban(rng, fake_eu)
    if kind == 5:
        return pii_corpus.never_issued_ssn(rng, ["000", "666", "912"])
    if kind == 6:
        return f"Total: ${rng.randint(1, 99)},{rng.randint(100, 999)}.{rng.randint(10, 99)} due {fake.date(pattern='%m/%d/%Y')}"
    if kind == 7:
        return f"Request id {fake.uuid4()} took {rng.randint(10, 999)} ms."
    if kind == 8:
        return f"Device MAC {fake.mac_address()} rebooted at {fake.time()}."
    if kind == 9:
        return f"Tracking number 1Z{rand(string.ascii_uppercase + string.digits, 16)} and invoice {rng.randint(10**9, 10**10 - 1)}"
    if kind == 10:
        return f"ISBN 978-{rng.randint(0, 9)}-{rng.randint(10, 99)}-{rng.randint(100000, 999999)}-{rng.randint(0, 9)}"
    if kind == 11:
        return f"Install pkg@{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)} and mail admin@localhost"
    if kind == 12:
        return f"In Q{rng.randint(1, 4)} {rng.randint(2015, 2025)} revenue grew {rng.randint(1, 40)}.{rng.randint(0, 9)}% to {rng.randint(1, 999)},{rng.randint(100, 999)},000."
    return f"Build {rng.randint(1000, 9999)} of release {rng.randint(1, 9)}.{rng.randint(0, 9)} passed {rng.randint(100, 999)} tests."


def corpus(seed):
    rng.seed(seed)
    Faker.seed(seed)
    items = []
    for entity in ENTITIES:
        for _ in range(PER_ENTITY):
            value = GENERATORS[entity]()
            template = rng.choice(TEMPLATES)
            before, after = template.split("{v}")
            prefix = before.format(label=LABELS[entity], name=fake.name())
            text = prefix + value + after.format(label=LABELS[entity], name=fake.name())
            items.append({"text": text, "gold": [[entity, len(prefix), len(prefix) + len(value)]]})
    for _ in range(NEGATIVES):
        items.append({"text": hard_negative(), "gold": []})
    return items


def score(items, predictions, entities):
    """Per entity: true positives, predictions, gold values."""
    table = {e: {"tp_pred": 0, "pred": 0, "tp_gold": 0, "gold": 0} for e in entities}
    for item, found in zip(items, predictions):
        for entity, start, end in found:
            if entity not in table:
                continue
            table[entity]["pred"] += 1
            if any(g[0] == entity and g[1] < end and start < g[2] for g in item["gold"]):
                table[entity]["tp_pred"] += 1
        for entity, start, end in item["gold"]:
            if entity not in table:
                continue
            table[entity]["gold"] += 1
            if any(f[0] == entity and f[1] < end and start < f[2] for f in found):
                table[entity]["tp_gold"] += 1
    return table


def ours(items):
    lines = subprocess.run([str(SCANNER)], input="\n".join(json.dumps({"text": i["text"]}) for i in items) + "\n",
                           capture_output=True, text=True, check=True).stdout.splitlines()
    timing = json.loads(lines[-1])
    return [json.loads(line)["found"] for line in lines[:-1]], timing["seconds"]


def presidio(items):
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import SpacyNlpEngine

    class BlankEnglish(SpacyNlpEngine):
        """Tokenization only: no NER model can be downloaded here; pattern recognizers work."""
        def __init__(self):
            super().__init__(models=[{"lang_code": "en", "model_name": "blank"}])
            self.nlp = {"en": spacy.blank("en")}

        def load(self):
            pass

    engine = AnalyzerEngine(nlp_engine=BlankEnglish(), supported_languages=["en"])
    engine.analyze("warm up a@b.io", language="en")
    started = time.perf_counter()
    results = [engine.analyze(item["text"], language="en") for item in items]
    seconds = time.perf_counter() - started
    return [[[PRESIDIO[r.entity_type], r.start, r.end] for r in found if r.entity_type in PRESIDIO]
            for found in results], seconds


def fmt(table, entity):
    row = table.get(entity)
    if row is None:
        return "n/a", "n/a"
    precision = row["tp_pred"] / row["pred"] if row["pred"] else 1.0
    recall = row["tp_gold"] / row["gold"] if row["gold"] else 1.0
    return f"{precision:.3f}", f"{recall:.3f}"


def evaluate(seed, label, items=None, show_misses=True):
    items = items if items is not None else corpus(seed)
    total_bytes = sum(len(i["text"].encode()) for i in items)
    our_predictions, our_seconds = ours(items)
    our_table = score(items, our_predictions, ENTITIES)
    if os.environ.get("NO_PRESIDIO"):
        their_predictions, their_seconds = [[] for _ in items], float("nan")
        their_table = {}
    else:
        their_predictions, their_seconds = presidio(items)
        their_table = score(items, their_predictions, [e for e in ENTITIES if e != "secret"])
    lines = [
        f"## {label} (seed {seed})",
        "",
        f"{len(items)} texts ({PER_ENTITY} per entity with one or more embedded values, {NEGATIVES} hard negatives), "
        f"{total_bytes / 1024:.0f} KiB.",
        "",
        "| entity | gold values | pii-guard precision | pii-guard recall | presidio precision | presidio recall |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for entity in ENTITIES:
        ours_p, ours_r = fmt(our_table, entity)
        theirs_p, theirs_r = fmt(their_table, entity)
        lines.append(f"| {entity} | {our_table[entity]['gold']} | {ours_p} | {ours_r} | {theirs_p} | {theirs_r} |")
    lines += [
        "",
        "| engine | corpus time | throughput | per text |",
        "|---|---:|---:|---:|",
        f"| pii-guard recognizers (Rust, one core) | {our_seconds * 1e3:.2f} ms | "
        f"{total_bytes / our_seconds / 1e6:.0f} MB/s | {our_seconds / len(items) * 1e6:.2f} µs |",
        f"| presidio-analyzer (Python) | {their_seconds * 1e3:.0f} ms | {total_bytes / their_seconds / 1e6:.3f} MB/s | "
        f"{their_seconds / len(items) * 1e6:.0f} µs |",
        "",
        f"pii-guard is {their_seconds / our_seconds:.0f}x faster on the same texts.",
    ]
    misses = [(i["text"], i["gold"], f) for i, f in zip(items, our_predictions)
              if sorted(g[0] for g in i["gold"]) != sorted(x[0] for x in f)]
    if misses and show_misses:
        lines += ["", "Texts pii-guard got wrong (up to 3 per entity):", ""]
        shown = {}
        for text, gold, found in misses:
            key = (gold or found)[0][0]
            shown[key] = shown.get(key, 0) + 1
            if shown[key] <= (3 if len(misses) < 50 else 8):
                lines.append(f"- `{json.dumps(text)[1:-1][:140]}` gold {gold} found {found}")
    return lines


def main():
    lines = [
        "# pii-guard recognizers vs presidio-analyzer",
        "",
        "Generated by `bench/guard_eval.sh` (faker): realistic sentences with one embedded value each, plus hard "
        "negatives (order and tracking numbers, timestamps, dates, versions, prices, UUIDs, MAC addresses, numbers "
        "failing Luhn or mod-97, SSNs from never-issued ranges). A finding is correct when it overlaps a gold value of "
        "the same entity. presidio-analyzer runs its pattern recognizers with a blank spaCy pipeline (no NER model can "
        "be downloaded here) at its default score threshold; it has no secret recognizer.",
        "",
    ]
    only = sys.argv[1:]
    for seed, label in SEEDS:
        if not only or "faker" in only:
            lines += evaluate(seed, label) + [""]
    for seed, label in CLASS_SEEDS:
        if not only or "classes" in only:
            # Misses are shown for the tuning seed only: the held-out seed stays unseen.
            lines += evaluate(seed, label, pii_corpus.corpus(seed), show_misses=seed == 11) + [""]
    text = "\n".join(lines)
    OUT.write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
