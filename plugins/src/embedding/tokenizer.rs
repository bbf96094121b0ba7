//! The subset of Hugging Face `tokenizer.json` that static embedding models ship: BPE with byte
//! fallback (Llama-2, wordllama) and WordPiece (BERT vocabularies, Model2Vec), with the
//! normalizers and pre-tokenizers they use. Anything else is refused at load with its name, so
//! a model that would be tokenized differently from its reference never loads.

use rustc_hash::FxHashMap as HashMap;
use serde::Deserialize;
use serde_json::Value;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// A loaded tokenizer: text in, token ids out (no special tokens added).
#[derive(Debug)]
pub struct Tokenizer {
    normalizers: Vec<Normalizer>,
    pre_tokenizer: PreTokenizer,
    model: Model,
    /// Tells this tokenizer's entries apart in the per-thread word cache.
    id: u64,
}

/// Words seen lately and their ids, per thread (a worker never waits on another): real prompts
/// repeat most of their words, and a word's ids never change.
const WORD_CACHE_ENTRIES: usize = 32_768;

/// Per tokenizer: word -> ids.
type WordCache = HashMap<u64, HashMap<Box<str>, Box<[u32]>>>;

thread_local! {
    static WORD_CACHE: RefCell<WordCache> = RefCell::new(HashMap::default());
}

static NEXT_TOKENIZER_ID: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
enum Normalizer {
    Prepend(String),
    Replace(String, String),
    Lowercase,
    Nfc,
    Nfkc,
    Nfd,
    StripAccents,
    Strip {
        left: bool,
        right: bool,
    },
    Bert {
        clean_text: bool,
        chinese_chars: bool,
        strip_accents: bool,
        lowercase: bool,
    },
}

#[derive(Debug)]
enum PreTokenizer {
    /// The whole normalized text is one word (split only where that cannot change the result).
    None,
    /// Split on whitespace and punctuation (BERT).
    Bert,
    /// Split on whitespace only.
    WhitespaceSplit,
    /// `\w+|[^\w\s]+`.
    Whitespace,
    /// Replace spaces with a metaspace, optionally prepend one, split before each.
    Metaspace {
        replacement: char,
        prepend: bool,
        split: bool,
    },
}

#[derive(Debug)]
enum Model {
    Bpe(Bpe),
    WordPiece(WordPiece),
}

#[derive(Debug)]
struct Bpe {
    vocab: HashMap<String, u32>,
    /// Single characters' ids, looked up without building a string.
    chars: HashMap<char, u32>,
    /// (left id, right id) -> (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_fallback: bool,
    /// Token ids of `<0x00>`..`<0xFF>` when byte fallback is on.
    bytes: Vec<Option<u32>>,
    unk: Option<u32>,
    fuse_unk: bool,
    /// Merges never join a metaspace to the character before it, so a text may be cut into
    /// words before each metaspace that follows another character without changing the result.
    split_on_metaspace: bool,
}

#[derive(Debug)]
struct WordPiece {
    vocab: HashMap<String, u32>,
    prefix: String,
    unk: u32,
    max_chars: usize,
}

const METASPACE: char = '\u{2581}';

#[derive(Deserialize)]
struct TokenizerJson {
    normalizer: Option<Value>,
    pre_tokenizer: Option<Value>,
    model: Value,
}

fn field<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    value.get(key).filter(|v| !v.is_null())
}

fn kind(value: &Value) -> &str {
    value.get("type").and_then(Value::as_str).unwrap_or("")
}

impl Tokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_json(bytes: &[u8]) -> Result<Tokenizer, String> {
        let json: TokenizerJson =
            serde_json::from_slice(bytes).map_err(|err| format!("not a tokenizer.json: {err}"))?;
        let mut normalizers = Vec::new();
        if let Some(normalizer) = &json.normalizer {
            flatten_normalizer(normalizer, &mut normalizers)?;
        }
        let pre_tokenizer = match &json.pre_tokenizer {
            None => PreTokenizer::None,
            Some(value) => pre_tokenizer(value)?,
        };
        let model = match kind(&json.model) {
            "BPE" => Model::Bpe(Bpe::from_json(&json.model)?),
            "WordPiece" => Model::WordPiece(WordPiece::from_json(&json.model)?),
            other => {
                return Err(format!(
                    "tokenizer model {other:?} is not supported (BPE and WordPiece are)"
                ))
            }
        };
        Ok(Tokenizer {
            normalizers,
            pre_tokenizer,
            model,
            id: NEXT_TOKENIZER_ID.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// Clears this thread's word cache (benchmarks of the cold path).
    pub fn clear_cache() {
        WORD_CACHE.with(|cache| cache.borrow_mut().clear());
    }

    /// The largest token id plus one.
    pub fn vocab_size(&self) -> usize {
        let vocab = match &self.model {
            Model::Bpe(bpe) => &bpe.vocab,
            Model::WordPiece(wordpiece) => &wordpiece.vocab,
        };
        vocab.values().max().map_or(0, |max| *max as usize + 1)
    }

    /// The token ids of `text`, as the reference tokenizer gives them without special tokens.
    pub fn encode(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return; // normalizers such as Prepend leave an empty text empty
        }
        let mut normalized = std::borrow::Cow::Borrowed(text);
        for normalizer in &self.normalizers {
            normalized = std::borrow::Cow::Owned(normalizer.apply(&normalized));
        }
        let id = self.id;
        let model = &self.model;
        WORD_CACHE.with(|caches| {
            let mut caches = caches.borrow_mut();
            let cache = caches.entry(id).or_default();
            let mut encode_word = |word: &str| {
                if let Some(cached) = cache.get(word) {
                    ids.extend_from_slice(cached);
                    return;
                }
                let start = ids.len();
                match model {
                    Model::Bpe(bpe) => bpe.encode_word(word, ids),
                    Model::WordPiece(wordpiece) => wordpiece.encode_word(word, ids),
                }
                if word.len() <= 64 {
                    if cache.len() >= WORD_CACHE_ENTRIES {
                        cache.clear();
                    }
                    cache.insert(Box::from(word), ids[start..].into());
                }
            };
            self.split(&normalized, &mut encode_word);
        });
    }

    fn split(&self, normalized: &str, encode_word: &mut dyn FnMut(&str)) {
        let mut encode_word = |word: &str| encode_word(word);
        match &self.pre_tokenizer {
            PreTokenizer::None => match &self.model {
                Model::Bpe(bpe) if bpe.split_on_metaspace => split_before_metaspace(normalized, &mut encode_word),
                _ => encode_word(normalized),
            },
            PreTokenizer::Bert => split_bert(normalized, &mut encode_word),
            PreTokenizer::WhitespaceSplit => normalized.split_whitespace().for_each(encode_word),
            PreTokenizer::Whitespace => split_word_classes(normalized, &mut encode_word),
            PreTokenizer::Metaspace {
                replacement,
                prepend,
                split,
            } => {
                let mut text: String = normalized
                    .chars()
                    .map(|c| if c == ' ' { *replacement } else { c })
                    .collect();
                if *prepend && !text.starts_with(*replacement) {
                    text.insert(0, *replacement);
                }
                if *split {
                    split_before(&text, *replacement, &mut encode_word);
                } else {
                    encode_word(&text);
                }
            }
        }
    }
}

fn flatten_normalizer(value: &Value, out: &mut Vec<Normalizer>) -> Result<(), String> {
    let flag = |key: &str, default: bool| value.get(key).and_then(Value::as_bool).unwrap_or(default);
    match kind(value) {
        "Sequence" => {
            for item in value.get("normalizers").and_then(Value::as_array).into_iter().flatten() {
                flatten_normalizer(item, out)?;
            }
        }
        "Prepend" => out.push(Normalizer::Prepend(
            value
                .get("prepend")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        )),
        "Replace" => {
            let pattern = value
                .get("pattern")
                .and_then(|p| p.get("String"))
                .and_then(Value::as_str)
                .ok_or("normalizer Replace with a regex pattern is not supported (only String patterns)")?;
            let content = value.get("content").and_then(Value::as_str).unwrap_or_default();
            out.push(Normalizer::Replace(pattern.to_string(), content.to_string()));
        }
        "Lowercase" => out.push(Normalizer::Lowercase),
        "NFC" => out.push(Normalizer::Nfc),
        "NFKC" => out.push(Normalizer::Nfkc),
        "NFD" => out.push(Normalizer::Nfd),
        "StripAccents" => out.push(Normalizer::StripAccents),
        "Strip" => out.push(Normalizer::Strip {
            left: flag("strip_left", true),
            right: flag("strip_right", true),
        }),
        "BertNormalizer" => {
            let lowercase = flag("lowercase", true);
            // `strip_accents: null` follows `lowercase`, as in the reference.
            let strip_accents = value.get("strip_accents").and_then(Value::as_bool).unwrap_or(lowercase);
            out.push(Normalizer::Bert {
                clean_text: flag("clean_text", true),
                chinese_chars: flag("handle_chinese_chars", true),
                strip_accents,
                lowercase,
            });
        }
        other => return Err(format!("normalizer {other:?} is not supported")),
    }
    Ok(())
}

fn pre_tokenizer(value: &Value) -> Result<PreTokenizer, String> {
    match kind(value) {
        "BertPreTokenizer" => Ok(PreTokenizer::Bert),
        "WhitespaceSplit" => Ok(PreTokenizer::WhitespaceSplit),
        "Whitespace" => Ok(PreTokenizer::Whitespace),
        "Metaspace" => {
            let replacement = value
                .get("replacement")
                .and_then(Value::as_str)
                .and_then(|s| s.chars().next())
                .unwrap_or(METASPACE);
            let prepend = match value.get("prepend_scheme").and_then(Value::as_str) {
                Some("never") => false,
                Some("first") | Some("always") => true,
                _ => value.get("add_prefix_space").and_then(Value::as_bool).unwrap_or(true),
            };
            let split = value.get("split").and_then(Value::as_bool).unwrap_or(true);
            Ok(PreTokenizer::Metaspace {
                replacement,
                prepend,
                split,
            })
        }
        "Sequence" => {
            let items = value
                .get("pretokenizers")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            match items.as_slice() {
                [only] => pre_tokenizer(only),
                _ => Err("pre-tokenizer Sequence of several steps is not supported".into()),
            }
        }
        other => Err(format!("pre-tokenizer {other:?} is not supported")),
    }
}

impl Normalizer {
    fn apply(&self, text: &str) -> String {
        match self {
            Normalizer::Prepend(prefix) => format!("{prefix}{text}"),
            Normalizer::Replace(pattern, content) => text.replace(pattern.as_str(), content),
            Normalizer::Lowercase => text.to_lowercase(),
            Normalizer::Nfc => text.nfc().collect(),
            Normalizer::Nfkc => text.nfkc().collect(),
            Normalizer::Nfd => text.nfd().collect(),
            Normalizer::StripAccents => strip_accents(text),
            Normalizer::Strip { left, right } => {
                let text = if *left { text.trim_start() } else { text };
                (if *right { text.trim_end() } else { text }).to_string()
            }
            Normalizer::Bert {
                clean_text,
                chinese_chars,
                strip_accents: strip,
                lowercase,
            } => {
                let mut out = String::with_capacity(text.len());
                for c in text.chars() {
                    if *clean_text {
                        // Controls in the wide sense (every C* category) go, as in BERT.
                        let control = !matches!(c, '\t' | '\n' | '\r')
                            && c.general_category_group() == GeneralCategoryGroup::Other;
                        if c == '\0' || c == '\u{fffd}' || control {
                            continue;
                        }
                        if c.is_whitespace() {
                            out.push(' ');
                            continue;
                        }
                    }
                    if *chinese_chars && is_cjk(c) {
                        out.push(' ');
                        out.push(c);
                        out.push(' ');
                    } else {
                        out.push(c);
                    }
                }
                if *strip {
                    out = strip_accents(&out);
                }
                if *lowercase {
                    out = out.to_lowercase();
                }
                out
            }
        }
    }
}

/// NFD, then without nonspacing marks (`Mn`): spacing vowel signs of Indic scripts stay.
fn strip_accents(text: &str) -> String {
    text.nfd()
        .filter(|c| c.general_category() != GeneralCategory::NonspacingMark)
        .collect()
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32,
        0x4E00..=0x9FFF | 0x3400..=0x4DBF | 0x20000..=0x2A6DF | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F | 0x2B820..=0x2CEAF | 0xF900..=0xFAFF | 0x2F800..=0x2FA1F)
}

/// BERT's punctuation: ASCII symbols and every Unicode punctuation category (P*).
fn is_bert_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.general_category_group() == GeneralCategoryGroup::Punctuation
}

fn split_bert(text: &str, emit: &mut dyn FnMut(&str)) {
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            if let Some(s) = start.take() {
                emit(&text[s..i]);
            }
        } else if is_bert_punctuation(c) {
            if let Some(s) = start.take() {
                emit(&text[s..i]);
            }
            emit(&text[i..i + c.len_utf8()]);
        } else if start.is_none() {
            start = Some(i);
        }
    }
    if let Some(s) = start {
        emit(&text[s..]);
    }
}

fn split_word_classes(text: &str, emit: &mut dyn FnMut(&str)) {
    // `\w+|[^\w\s]+`
    let class = |c: char| {
        if c.is_whitespace() {
            0
        } else if c.is_alphanumeric() || c == '_' {
            1
        } else {
            2
        }
    };
    let mut start = 0;
    let mut current = 0;
    for (i, c) in text.char_indices() {
        let k = class(c);
        if k != current {
            if current != 0 {
                emit(&text[start..i]);
            }
            start = i;
            current = k;
        }
    }
    if current != 0 {
        emit(&text[start..]);
    }
}

fn split_before(text: &str, mark: char, emit: &mut dyn FnMut(&str)) {
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if c == mark && i > start {
            emit(&text[start..i]);
            start = i;
        }
    }
    if start < text.len() {
        emit(&text[start..]);
    }
}

/// Cuts before each metaspace that follows another character: `▁▁the▁cat` -> `▁▁the`, `▁cat`.
fn split_before_metaspace(text: &str, emit: &mut dyn FnMut(&str)) {
    let mut start = 0;
    let mut previous = METASPACE;
    for (i, c) in text.char_indices() {
        if c == METASPACE && previous != METASPACE && i > start {
            emit(&text[start..i]);
            start = i;
        }
        previous = c;
    }
    if start < text.len() {
        emit(&text[start..]);
    }
}

impl Bpe {
    fn from_json(model: &Value) -> Result<Bpe, String> {
        let vocab: HashMap<String, u32> = serde_json::from_value(field(model, "vocab").cloned().unwrap_or_default())
            .map_err(|err| format!("model.vocab: {err}"))?;
        let merges_json = field(model, "merges")
            .and_then(Value::as_array)
            .ok_or("model.merges is missing")?;
        let mut merges = HashMap::with_capacity_and_hasher(merges_json.len(), Default::default());
        let mut split_on_metaspace = true;
        for (rank, merge) in merges_json.iter().enumerate() {
            let (left, right) = match merge {
                Value::String(pair) => pair
                    .split_once(' ')
                    .ok_or_else(|| format!("model.merges[{rank}]: {pair:?} is not two tokens"))?,
                Value::Array(pair) if pair.len() == 2 => (
                    pair[0].as_str().unwrap_or_default(),
                    pair[1].as_str().unwrap_or_default(),
                ),
                _ => return Err(format!("model.merges[{rank}]: not a pair")),
            };
            let id = |token: &str| {
                vocab
                    .get(token)
                    .copied()
                    .ok_or_else(|| format!("model.merges[{rank}]: token {token:?} is not in the vocabulary"))
            };
            let merged = format!("{left}{right}");
            if has_metaspace_after_other(&merged) {
                split_on_metaspace = false;
            }
            merges.insert((id(left)?, id(right)?), (rank as u32, id(&merged)?));
        }
        let byte_fallback = model.get("byte_fallback").and_then(Value::as_bool).unwrap_or(false);
        let bytes = (0..=255u8)
            .map(|b| vocab.get(&format!("<0x{b:02X}>")).copied())
            .collect();
        let unk = field(model, "unk_token")
            .and_then(Value::as_str)
            .and_then(|token| vocab.get(token).copied());
        if model.get("dropout").is_some_and(|d| !d.is_null()) {
            return Err("BPE dropout is not supported".into());
        }
        if field(model, "continuing_subword_prefix").is_some() || field(model, "end_of_word_suffix").is_some() {
            return Err("BPE subword prefixes and suffixes are not supported".into());
        }
        let chars = vocab
            .iter()
            .filter_map(|(token, id)| {
                let mut it = token.chars();
                match (it.next(), it.next()) {
                    (Some(c), None) => Some((c, *id)),
                    _ => None,
                }
            })
            .collect();
        Ok(Bpe {
            vocab,
            chars,
            merges,
            byte_fallback,
            bytes,
            unk,
            fuse_unk: model.get("fuse_unk").and_then(Value::as_bool).unwrap_or(false),
            split_on_metaspace,
        })
    }

    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        let mut symbols: Vec<u32> = Vec::with_capacity(word.len());
        let mut buffer = [0u8; 4];
        for c in word.chars() {
            if let Some(id) = self.chars.get(&c) {
                symbols.push(*id);
                continue;
            }
            let fallback: Option<Vec<u32>> = self
                .byte_fallback
                .then(|| {
                    c.encode_utf8(&mut buffer)
                        .bytes()
                        .map(|b| self.bytes[b as usize])
                        .collect()
                })
                .flatten();
            match fallback {
                Some(bytes) => symbols.extend(bytes),
                None => {
                    if let Some(unk) = self.unk {
                        if !(self.fuse_unk && symbols.last() == Some(&unk)) {
                            symbols.push(unk);
                        }
                    }
                }
            }
        }
        // Merge the lowest-ranked pair (leftmost on ties) until none is left. `pairs[i]` is the
        // merge of symbols i and i+1, looked up again only next to a merge.
        let lookup = |a: u32, b: u32| self.merges.get(&(a, b)).copied().unwrap_or((u32::MAX, 0));
        let mut pairs: Vec<(u32, u32)> = symbols.windows(2).map(|w| lookup(w[0], w[1])).collect();
        let best = |pairs: &[(u32, u32)]| {
            pairs
                .iter()
                .enumerate()
                .min_by_key(|(i, (rank, _))| (*rank, *i))
                .filter(|(_, (rank, _))| *rank != u32::MAX)
                .map(|(i, pair)| (i, *pair))
        };
        while let Some((i, (_, merged))) = best(&pairs) {
            symbols[i] = merged;
            symbols.remove(i + 1);
            pairs.remove(i);
            if i > 0 {
                pairs[i - 1] = lookup(symbols[i - 1], symbols[i]);
            }
            if i < pairs.len() {
                pairs[i] = lookup(symbols[i], symbols[i + 1]);
            }
        }
        ids.extend_from_slice(&symbols);
    }
}

fn has_metaspace_after_other(token: &str) -> bool {
    let mut previous = METASPACE;
    token.chars().any(|c| {
        let joined = c == METASPACE && previous != METASPACE;
        previous = c;
        joined
    })
}

impl WordPiece {
    fn from_json(model: &Value) -> Result<WordPiece, String> {
        let vocab: HashMap<String, u32> = serde_json::from_value(field(model, "vocab").cloned().unwrap_or_default())
            .map_err(|err| format!("model.vocab: {err}"))?;
        let unk_token = field(model, "unk_token").and_then(Value::as_str).unwrap_or("[UNK]");
        let unk = *vocab
            .get(unk_token)
            .ok_or_else(|| format!("model.unk_token {unk_token:?} is not in the vocabulary"))?;
        Ok(WordPiece {
            prefix: field(model, "continuing_subword_prefix")
                .and_then(Value::as_str)
                .unwrap_or("##")
                .to_string(),
            max_chars: field(model, "max_input_chars_per_word")
                .and_then(Value::as_u64)
                .unwrap_or(100) as usize,
            vocab,
            unk,
        })
    }

    /// Greedy longest match first; a word with a piece outside the vocabulary is one unknown.
    fn encode_word(&self, word: &str, ids: &mut Vec<u32>) {
        if word.chars().count() > self.max_chars {
            ids.push(self.unk);
            return;
        }
        let mark = ids.len();
        let mut start = 0;
        let mut piece = String::new();
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while end > start {
                piece.clear();
                if start > 0 {
                    piece.push_str(&self.prefix);
                }
                piece.push_str(&word[start..end]);
                if let Some(id) = self.vocab.get(&piece) {
                    found = Some(*id);
                    break;
                }
                end = word[..end].char_indices().next_back().map_or(start, |(i, _)| i);
            }
            match found {
                Some(id) => {
                    ids.push(id);
                    start = end;
                }
                None => {
                    ids.truncate(mark);
                    ids.push(self.unk);
                    return;
                }
            }
        }
    }
}
