"""The embedding component against the reference library: the same token ids and cosine >= 0.9999
with `wordllama`'s own vectors on 1,000 texts of mixed languages, emoji, characters the
vocabulary only has as bytes, odd spacing and lengths up to 4 KiB. The expected vectors are
computed here, with the pip package; no weights are committed."""
import json
import random
import subprocess

import numpy as np
import pytest

from harness import ROOT, wordllama_files

# Built by `cargo test` (examples are compiled with the tests); debug speed is plenty here.
EMBED = ROOT / "target" / "debug" / "examples" / "embed"

WORDS = {
    "en": "the quick brown fox jumps over lazy dog weather tomorrow book flight Boston Denver transfer money "
          "account balance please cancel my order what is how do I reset password credit card".split(),
    "de": "Wetter morgen bitte Flug buchen Konto Überweisung Straße größer Bücher schön".split(),
    "fr": "météo demain s'il vous plaît réserver vol compte virement été garçon naïve".split(),
    "es": "tiempo mañana por favor reservar vuelo cuenta transferencia niño año".split(),
    "ru": "погода завтра пожалуйста забронировать рейс счёт перевод".split(),
    "zh": "天气 明天 请 预订 航班 账户 转账 你好 世界".split(),
    "ja": "天気 明日 お願いします 予約 フライト 口座 振込 こんにちは".split(),
    "ar": "الطقس غدا من فضلك حجز رحلة حساب تحويل".split(),
    "hi": "मौसम कल कृपया उड़ान बुक खाता स्थानांतरण".split(),
    "ko": "날씨 내일 제발 항공편 예약 계좌 이체".split(),
}
EMOJI = ["🎉", "🚀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖", "☕"]
# Characters the Llama-2 vocabulary does not hold: they go through byte fallback.
RARE = ["𝔘", "∮", "⟁", "𓂀", "ꙮ", "🜁", "\u200b", "\u00ad", "ǅ", "ﬁ", "Ⅻ", "㊙"]
SPACES = [" ", "  ", "\t", "\n", " \n ", "   "]


def texts(count=1000, seed=2026):
    rng = random.Random(seed)
    out = ["", " ", "a", "  leading and trailing  ", "\n\n", "🎉", "𝔘𝔘𝔘", "1234567890", "x" * 4096]
    while len(out) < count:
        target = rng.choice([40, 100, 300, 1000, 4096])
        parts = []
        size = 0
        while size < target:
            roll = rng.random()
            if roll < 0.75:
                word = rng.choice(WORDS[rng.choice(list(WORDS))])
                word = word.upper() if rng.random() < 0.05 else word.capitalize() if rng.random() < 0.2 else word
            elif roll < 0.85:
                word = rng.choice(EMOJI)
            elif roll < 0.92:
                word = rng.choice(RARE)
            else:
                word = str(rng.randint(0, 10 ** rng.randint(1, 8))) + rng.choice(["", ".", ",", "?", "!", "%"])
            parts.append(word)
            parts.append(rng.choice(SPACES) if rng.random() < 0.1 else " ")
            size += len(word) + 1
        out.append("".join(parts)[:target])
    return out


@pytest.fixture(scope="module")
def reference():
    from wordllama import WordLlama

    weights, tokenizer = wordllama_files()
    model = WordLlama.load(cache_dir=weights.parents[1], disable_download=True)
    return model, weights, tokenizer


def test_token_ids_and_vectors_match_wordllama(reference):
    model, weights, tokenizer = reference
    corpus = texts()
    assert len(corpus) == 1000
    expected_ids = [enc.ids for enc in model.tokenizer.encode_batch(corpus, add_special_tokens=False)]
    expected_ids = [[i for i, m in zip(ids, enc.attention_mask) if m]
                    for ids, enc in zip(expected_ids, model.tokenizer.encode_batch(corpus, add_special_tokens=False))]
    table = model.embedding  # the reference's own f32 rows
    run = subprocess.run([EMBED, weights, tokenizer], input="\n".join(json.dumps(t) for t in corpus) + "\n",
                         capture_output=True, text=True, check=True)
    ours = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(ours) == len(corpus)
    id_mismatches = [t for t, e, o in zip(corpus, expected_ids, ours) if e != o["ids"]]
    assert not id_mismatches, f"{len(id_mismatches)} texts tokenized differently, e.g. {id_mismatches[:3]!r}"
    cosines = []
    for ids, record in zip(expected_ids, ours):
        if not ids:
            assert not any(record["vector"]), "a text without tokens embeds to zero"
            continue
        expected = table[ids].mean(axis=0)
        got = np.array(record["vector"], dtype=np.float32)
        cosines.append(float(expected @ got / (np.linalg.norm(expected) * np.linalg.norm(got))))
    assert len(cosines) >= 990
    assert min(cosines) >= 0.9999, min(cosines)
    # And against the library's embed() itself (its own pooling), on the texts with tokens.
    with_tokens = [t for t, ids in zip(corpus, expected_ids) if ids]
    library = model.embed(with_tokens[:200], norm=False)
    by_text = {t: o for t, o in zip(corpus, ours)}
    for text, vector in zip(with_tokens[:200], library):
        got = np.array(by_text[text]["vector"], dtype=np.float32)
        assert float(vector @ got / (np.linalg.norm(vector) * np.linalg.norm(got))) >= 0.9999, text


def test_model2vec_style_wordpiece_model_matches_the_reference_tokenizer(tmp_path):
    """The other static format: a BERT WordPiece tokenizer (lower-casing, accent stripping,
    Chinese characters split, punctuation split) and an F32 table, as Model2Vec models ship.
    The tokenizer is trained here with the reference `tokenizers` library; ids must match it
    and the vectors the mean of the table's rows."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    corpus = texts(count=600, seed=7)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(corpus[:300], trainers.WordPieceTrainer(
        vocab_size=3000, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    vocab = tokenizer.get_vocab_size()
    table = np.random.default_rng(7).standard_normal((vocab, 32)).astype(np.float32)
    save_file({"embeddings": table}, str(tmp_path / "model.safetensors"))

    run = subprocess.run([EMBED, tmp_path / "model.safetensors", tmp_path / "tokenizer.json"],
                         input="\n".join(json.dumps(t) for t in corpus) + "\n", capture_output=True, text=True,
                         check=True)
    ours = [json.loads(line) for line in run.stdout.splitlines()]
    expected = [enc.ids for enc in tokenizer.encode_batch(corpus, add_special_tokens=False)]
    mismatches = [(t, e, o["ids"]) for t, e, o in zip(corpus, expected, ours) if e != o["ids"]]
    assert not mismatches, f"{len(mismatches)} of {len(corpus)} differ, e.g. {mismatches[:2]!r}"
    for ids, record in zip(expected, ours):
        if ids:
            want = table[ids].mean(axis=0)
            got = np.array(record["vector"], dtype=np.float32)
            # The table is kept as f16: agreement well above 0.999.
            assert float(want @ got / (np.linalg.norm(want) * np.linalg.norm(got))) >= 0.9999


@pytest.mark.parametrize("case,expected", [
    ("missing", "No such file"),
    ("not-safetensors", "not a safetensors file"),
    ("wrong-shape", "expected [vocab, dim]"),
    ("too-few-rows", "the tokenizer has 32000 tokens but the table has 10 rows"),
    ("bad-tokenizer", "not a tokenizer.json"),
])
def test_bad_model_files_are_refused_with_a_reason(tmp_path, case, expected):
    from safetensors.numpy import save_file

    weights, tokenizer = wordllama_files()
    if case == "missing":
        weights = tmp_path / "nope.safetensors"
    elif case == "not-safetensors":
        weights = tmp_path / "x.safetensors"
        weights.write_bytes(b"hello world")
    elif case == "wrong-shape":
        weights = tmp_path / "x.safetensors"
        save_file({"embedding.weight": np.zeros((4, 4, 4), dtype=np.float16)}, str(weights))
    elif case == "too-few-rows":
        weights = tmp_path / "x.safetensors"
        save_file({"embedding.weight": np.zeros((10, 8), dtype=np.float16)}, str(weights))
    elif case == "bad-tokenizer":
        tokenizer = tmp_path / "tokenizer.json"
        tokenizer.write_text("{}")
    run = subprocess.run([EMBED, weights, tokenizer], input="", capture_output=True, text=True)
    assert run.returncode != 0
    assert expected in run.stderr, run.stderr
