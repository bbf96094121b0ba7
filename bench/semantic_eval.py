"""Semantic routing quality on CLINC150 (CC BY 3.0): the `semantic-router` plugin run through the
engine (plugins/examples/semantic_route.rs) against the same nearest-centroid algorithm in Python
on the reference library's embeddings (wordllama), and a TF-IDF baseline.

Task: the 10 domains as routes; each domain's intents give one example group each, k
utterances per intent drawn from the train split (seeds 0, 1, 2; mean and range reported; the
file's own first k are a worse, ordered sample); accuracy on the test split's
in-scope queries; out-of-scope queries (oos_test) against in-scope ones by the best route's
score (AUROC), and at a threshold chosen on the validation split (val + oos_val).

  .venv/bin/python bench/semantic_eval.py [--k 20] [--out bench/results/semantic_routing.md]
"""
import argparse
import json
import math
import random
import re
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from harness import ROOT, wordllama_files

ROUTE = ROOT / "target" / "release" / "examples" / "semantic_route"


def clinc_dir():
    for path in [ROOT.parent / "shared" / "datasets" / "clinc150", Path("/work/shared/datasets/clinc150")]:
        if (path / "data_full.json").exists():
            return path
    raise SystemExit("CLINC150 not found (../shared/datasets/clinc150)")


def auroc(positive, negative):
    """P(score of a positive > score of a negative), ties half."""
    scores = sorted([(s, 1) for s in positive] + [(s, 0) for s in negative])
    rank_sum, rank = 0.0, 1
    i = 0
    while i < len(scores):
        j = i
        while j < len(scores) and scores[j][0] == scores[i][0]:
            j += 1
        mean_rank = (rank + rank + (j - i) - 1) / 2
        rank_sum += mean_rank * sum(1 for s in scores[i:j] if s[1] == 1)
        rank += j - i
        i = j
    p, n = len(positive), len(negative)
    return (rank_sum - p * (p + 1) / 2) / (p * n)


def nearest_centroid(vectors_of, groups, queries):
    """(route index, best score) per query; groups: [(route index, [texts])]."""
    def unit(m):
        norms = np.linalg.norm(m, axis=1, keepdims=True)
        return m / np.where(norms == 0, 1, norms)
    centroids, owners = [], []
    for route, texts in groups:
        c = unit(vectors_of(texts)).sum(axis=0)
        centroids.append(c / (np.linalg.norm(c) or 1))
        owners.append(route)
    sims = unit(vectors_of(queries)) @ np.array(centroids).T
    best = sims.argmax(axis=1)
    return [owners[b] for b in best], sims.max(axis=1)


def tfidf(train_texts):
    tokenize = lambda t: re.findall(r"\w+", t.lower())
    df = Counter(w for t in train_texts for w in set(tokenize(t)))
    vocab = {w: i for i, w in enumerate(df)}
    idf = np.array([math.log((1 + len(train_texts)) / (1 + df[w])) + 1 for w in vocab])

    def vectors(texts):
        m = np.zeros((len(texts), len(vocab)), dtype=np.float32)
        for r, t in enumerate(texts):
            for w, c in Counter(tokenize(t)).items():
                if w in vocab:
                    m[r, vocab[w]] = c
        return m * idf
    return vectors


def rust_routes(chain_path, texts):
    run = subprocess.run([ROUTE, chain_path], input="\n".join(json.dumps(t) for t in texts) + "\n",
                         capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    return [r["route"] for r in rows], np.array([r["score"] for r in rows])


def evaluate(args, data, domains, by_intent, seed):
    """One draw of example utterances: a row per method."""
    domain_of = {intent: domain for domain, intents in domains.items() for intent in intents}
    names = sorted(domains)
    rng = random.Random(seed)
    groups = [(names.index(domain_of[intent]), rng.sample(texts, args.k)) for intent, texts in sorted(by_intent.items())]
    test = [(t, names.index(domain_of[i])) for t, i in data["test"]]
    val = [(t, names.index(domain_of[i])) for t, i in data["val"]]
    oos_test = [t for t, _ in data["oos_test"]]
    oos_val = [t for t, _ in data["oos_val"]]

    weights, tokenizer = wordllama_files()
    routes_yaml = []
    for index, name in enumerate(names):
        utterances = [texts for route, texts in groups if route == index]
        routes_yaml.append({"name": name, "model": f"{name}-model", "utterances": utterances})
    chain = {"processors": [{"name": "router", "type": "semantic-router", "parameters": {
        "embedding": {"weights": str(weights), "tokenizer": str(tokenizer)},
        "defaultModel": "general", "threshold": -1.0, "routes": routes_yaml}}]}
    chain_path = Path(tempfile.mkdtemp()) / "chain.json"
    chain_path.write_text(json.dumps(chain))

    # The plugin, through the engine.
    started = time.perf_counter()
    everything = [t for t, _ in test] + oos_test + [t for t, _ in val] + oos_val
    routed, scores = rust_routes(chain_path, everything)
    rust_seconds = time.perf_counter() - started
    cut = [len(test), len(test) + len(oos_test), len(test) + len(oos_test) + len(val)]
    parts = np.split(np.arange(len(everything)), cut)
    rust = {"pred": [names.index(r) for r in routed], "score": scores}

    # The reference library, same algorithm.
    from wordllama import WordLlama
    model = WordLlama.load(cache_dir=weights.parents[1], disable_download=True)
    embed = lambda texts: model.embed(texts, norm=False)
    pred, score = nearest_centroid(embed, groups, everything)
    reference = {"pred": pred, "score": score}
    # TF-IDF on the same example utterances.
    vectors = tfidf([t for _, texts in groups for t in texts])
    pred, score = nearest_centroid(vectors, groups, everything)
    baseline = {"pred": pred, "score": score}

    rows = []
    for label, run in [("semantic-router (this filter, engine)", rust), ("wordllama reference (Python)", reference),
                       ("TF-IDF baseline", baseline)]:
        test_idx, oos_idx, val_idx, oos_val_idx = parts
        accuracy = np.mean([run["pred"][i] == test[n][1] for n, i in enumerate(test_idx)])
        score = np.asarray(run["score"])
        area = auroc(list(score[test_idx]), list(score[oos_idx]))
        # Threshold chosen on validation: the one maximising in-scope accuracy + OOS recall.
        candidates = np.unique(np.round(score[np.concatenate([val_idx, oos_val_idx])], 3))
        best = max(candidates, key=lambda th: np.mean([run["pred"][i] == val[n][1] and score[i] >= th
                                                        for n, i in enumerate(val_idx)])
                   + np.mean(score[oos_val_idx] < th))
        in_scope = np.mean([run["pred"][i] == test[n][1] and score[i] >= best for n, i in enumerate(test_idx)])
        oos_recall = np.mean(score[oos_idx] < best)
        rows.append((label, accuracy, area, best, in_scope, oos_recall))
    return rows, rust_seconds, (len(test), len(oos_test), len(everything))



def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--seeds", type=lambda text: [int(x) for x in text.split(",")], default=[0, 1, 2])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "semantic_routing.md"))
    args = parser.parse_args()
    data = json.loads((clinc_dir() / "data_full.json").read_text())
    domains = json.loads((clinc_dir() / "domains.json").read_text())
    by_intent = {}
    for text, intent in data["train"]:
        by_intent.setdefault(intent, []).append(text)
    all_rows = {}
    rust_seconds = 0.0
    for seed in args.seeds:
        rows, seconds, counts = evaluate(args, data, domains, by_intent, seed)
        rust_seconds += seconds
        for label, *values in rows:
            all_rows.setdefault(label, []).append(values)
    test_count, oos_count, prompt_count = counts
    def span(values, fmt):
        return f"{fmt(np.mean(values))} ({fmt(min(values))}–{fmt(max(values))})"
    pct = lambda x: f"{x:.1%}"
    num = lambda x: f"{x:.3f}"
    lines = [
        "# Semantic routing on CLINC150",
        "",
        f"`bench/semantic_eval.py`, k={args.k} train utterances per intent (drawn with seeds "
        f"{', '.join(map(str, args.seeds))}; mean and range), each intent one example group of its domain's route "
        f"(10 routes), nearest centroid scored by the best group; test split ({test_count} in-scope, "
        f"{oos_count} out-of-scope); threshold chosen on the validation split. Model: wordllama `l2_supercat_256`.",
        "",
        "| | domain accuracy (test) | OOS AUROC | threshold (from val) | in-scope correct at threshold | OOS caught at threshold |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, values in all_rows.items():
        columns = list(zip(*values))
        lines.append(f"| {label} | {span(columns[0], pct)} | {span(columns[1], num)} | {span(columns[2], num)} | "
                     f"{span(columns[3], pct)} | {span(columns[4], pct)} |")
    lines += ["", f"The engine routed {prompt_count} prompts per seed; all seeds took {rust_seconds:.2f} s, "
              "process start and model load included."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
