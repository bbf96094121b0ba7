"""Hit and false-hit figures of `response-cache` in Semantic mode, measured through the engine
(plugins/examples/cache_pairs.rs runs the real plugin: the first prompt of a pair is answered and
kept, the second asked). Pairs come from CLINC150's test split (CC BY 3.0) and from our own
templates, seeded:

- rewording: the same question reworded on the surface (a polite prefix or suffix, a
  contraction, another case, punctuation). Should hit.
- same intent: two different test utterances of one intent. Neither a hit nor a miss is right
  for all of them; the rate says how far a threshold reaches.
- nearest other intent: each test utterance with the most similar train utterance of another
  intent (by the reference library's cosine). Must miss.
- number changed / negated / names swapped: one number changed, a negation inserted, two
  names swapped or one replaced. Must miss.

Each set runs with the default guard words and with cosine alone (guard words off), at three
thresholds.

  .venv/bin/python bench/cache_eval.py [--pairs 400] [--out bench/results/response_cache.md]
"""
import argparse
import json
import random
import re
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from harness import ROOT, wordllama_files

PAIRS = ROOT / "target" / "release" / "examples" / "cache_pairs"
THRESHOLDS = [0.85, 0.90, 0.95]
CITIES = ["London", "Paris", "Boston", "Denver", "Tokyo", "Berlin", "Madrid", "Chicago", "Seattle", "Rome",
          "Toronto", "Sydney", "Dublin", "Lisbon", "Austin", "Miami"]
PEOPLE = ["Alice", "Bob", "Maria", "Chen", "Priya", "Omar", "Sofia", "Lukas"]
NAME_TEMPLATES = [
    "flights from {a} to {b} tomorrow", "how long is the drive from {a} to {b}",
    "what is the time difference between {a} and {b}", "book a train from {a} to {b}",
    "is it colder in {a} than in {b}", "send the report from {p} to {q}", "did {p} pay {q} back",
    "schedule a meeting with {p} and {q}", "what's the weather in {a}", "find me a hotel in {a}",
]


def clinc():
    for path in [ROOT.parent / "shared" / "datasets" / "clinc150", Path("/work/shared/datasets/clinc150")]:
        if (path / "data_full.json").exists():
            return json.loads((path / "data_full.json").read_text())
    raise SystemExit("CLINC150 not found (../shared/datasets/clinc150)")


def reword(text, rng):
    rules = [
        lambda t: "please " + t, lambda t: "can you tell me " + t, lambda t: t + " please",
        lambda t: t + "?", lambda t: t[:1].upper() + t[1:], lambda t: "hey, " + t, lambda t: t + " thanks",
        lambda t: t.replace("what is", "what's") if "what is" in t else t.replace("i am", "i'm"),
    ]
    out = rng.choice(rules)(text)
    return out if out != text else text + "?"


def change_number(text, rng):
    numbers = re.findall(r"\d+", text)
    if not numbers:
        return None
    old = rng.choice(numbers)
    # Digits inside words count too ("10am" -> "11am").
    return re.sub(rf"(?<!\d){old}(?!\d)", str(int(old) + rng.choice([1, 2, 5, 10])), text, count=1)


def negate(text):
    for word in ["is", "are", "can", "do", "does", "will", "should", "was", "have", "did"]:
        if re.search(rf"\b{word}\b", text):
            return re.sub(rf"\b{word}\b", f"{word} not", text, count=1)
    return None


def name_pairs(rng, count):
    pairs = []
    for _ in range(count):
        template = rng.choice(NAME_TEMPLATES)
        a, b = rng.sample(CITIES, 2)
        p, q = rng.sample(PEOPLE, 2)
        first = template.format(a=a, b=b, p=p, q=q)
        if "{b}" in template or "{q}" in template:
            second = template.format(a=b, b=a, p=q, q=p)  # swapped
        else:
            c = rng.choice([c for c in CITIES if c != a])
            second = template.format(a=c, b=b, p=p, q=q)  # replaced
        pairs.append((first, second))
    return pairs


def nearest_other_intent(test, train, rng, count):
    from wordllama import WordLlama
    import wordllama
    model = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True, dim=256)

    def unit(texts):
        m = np.asarray(model.embed(texts), dtype=np.float32)
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)

    sample = rng.sample(test, count)
    queries = unit([t for t, _ in sample])
    corpus = unit([t for t, _ in train])
    scores = queries @ corpus.T
    pairs = []
    for i, (text, intent) in enumerate(sample):
        order = np.argsort(-scores[i])
        j = next(j for j in order if train[j][1] != intent)
        pairs.append((text, train[j][0]))
    return pairs


def run(pairs, threshold, guarded):
    weights, tokenizer = wordllama_files()
    guard = {} if guarded else {"guardWords": {"numbers": False, "capitalized": False, "negations": []}}
    chain = {"processors": [{"name": "cache", "type": "response-cache", "parameters": {
        "mode": "Semantic", "similarityThreshold": threshold, "partitionBy": ["x-pair"], "maxEntries": 100000,
        "embedding": {"weights": str(weights), "tokenizer": str(tokenizer)}, **guard}}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        json.dump(chain, f)
    lines = "\n".join(json.dumps(list(p)) for p in pairs) + "\n"
    out = subprocess.run([str(PAIRS), f.name], input=lines, capture_output=True, text=True, check=True).stdout
    hits = [line == "true" for line in out.split()]
    assert len(hits) == len(pairs)
    return sum(hits) / len(pairs)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=400, help="pairs per set (fewer where a set has fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "response_cache.md"))
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "-q", "--release", "-p", "payload-processor-plugins", "--example",
                    "cache_pairs"], cwd=ROOT, check=True)
    rng = random.Random(args.seed)
    data = clinc()
    test = [(t, i) for t, i in data["test"]]
    train = [(t, i) for t, i in data["train"]]
    by_intent = defaultdict(list)
    for text, intent in test:
        by_intent[intent].append(text)
    sets = {}
    sets["rewording (should hit)"] = [(t, reword(t, rng)) for t, _ in rng.sample(test, args.pairs)]
    same = []
    for _ in range(args.pairs):
        texts = by_intent[rng.choice(sorted(by_intent))]
        same.append(tuple(rng.sample(texts, 2)))
    sets["same intent, other utterance"] = same
    sets["nearest other intent (must miss)"] = nearest_other_intent(test, train, rng, args.pairs)
    numbered = [(t, change_number(t, rng)) for t, _ in test if re.search(r"\d", t)]
    numbered = [(a, b) for a, b in numbered if a != b]
    sets["number changed (must miss)"] = rng.sample(numbered, min(args.pairs, len(numbered)))
    negated = [(t, negate(t)) for t, _ in test]
    sets["negated (must miss)"] = rng.sample([p for p in negated if p[1]], args.pairs)
    sets["names swapped or replaced (must miss)"] = name_pairs(rng, args.pairs)
    started = time.time()
    rows = []
    for name, pairs in sets.items():
        cells = []
        for threshold in THRESHOLDS:
            guarded = run(pairs, threshold, True)
            alone = run(pairs, threshold, False)
            cells.append(f"{guarded:.1%} / {alone:.1%}")
        rows.append(f"| {name} | {len(pairs)} | " + " | ".join(cells) + " |")
        print(rows[-1], flush=True)
    table = "\n".join([
        "| pair set | pairs | " + " | ".join(f"served at {t}" for t in THRESHOLDS) + " |",
        "|---|---|" + "---|" * len(THRESHOLDS),
        *rows,
    ])
    text = f"""# response-cache: hits and false hits (Semantic mode)

Measured by `bench/cache_eval.py` (seed {args.seed}) through the engine: the real `response-cache`
plugin (plugins/examples/cache_pairs.rs) answers the first prompt of each pair from a stand-in
upstream, keeps it, and is asked the second. Each cell: the share of second prompts served from
the cache **with the default guard words / with cosine alone** (guard words off). Pairs from
CLINC150's test split (CC BY 3.0) and, for names, our own templates (CLINC150 is lower case).

{table}

- Rewording should be served; the four "must miss" sets are false hits when served.
- "Same intent" pairs are different questions of one intent ("what's my balance" / "how much
  is in checking"): some share an answer, many do not. The rate shows how far a threshold
  reaches, not a right answer.
- Guard words (numbers, negations, names in order) turn the number, negation and name cases
  into misses whatever the cosine; what is left is the cosine's own reach.

Run time: {time.time() - started:.0f} s.
"""
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
