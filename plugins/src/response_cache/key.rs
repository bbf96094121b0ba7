//! What makes two requests the same question: a hash of everything that changes an answer, and,
//! for semantic matches, the words a static embedding is blind to (numbers, negations, names)
//! in their order.

use serde_json::Value;
use sha2::{Digest, Sha256};

/// A SHA-256 digest: a collision between two different requests would serve one the other's
/// answer, so no 64-bit hash.
pub type Digest32 = [u8; 32];

/// Body fields that identify the caller or ask the provider to keep data, not what the answer
/// says: left out of the key so that a cache serves every caller of a partition alike.
const IGNORED_FIELDS: &[&str] = &["user", "metadata", "store", "safety_identifier", "prompt_cache_key"];

/// A hash of the request under a cache: the path, the partition's header values, and the body
/// with its object keys in sorted order (so key order does not matter) and without the
/// [`IGNORED_FIELDS`]. `skip` (by address) is one value of the body hashed as a placeholder
/// instead: the last user message, which semantic matching compares by meaning.
pub fn request_digest(path: &str, partition: &[Option<String>], doc: &Value, skip: Option<&Value>) -> Digest32 {
    let mut hasher = Sha256::new();
    hash_str(&mut hasher, path);
    for value in partition {
        match value {
            Some(value) => {
                hasher.update([1]);
                hash_str(&mut hasher, value);
            }
            None => hasher.update([0]),
        }
    }
    let skip = skip.map(|value| value as *const Value);
    match doc {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().filter(|k| !IGNORED_FIELDS.contains(&k.as_str())).collect();
            keys.sort_unstable();
            hasher.update([b'{']);
            hasher.update((keys.len() as u64).to_le_bytes());
            for key in keys {
                hash_str(&mut hasher, key);
                hash_value(&mut hasher, &map[key], skip);
            }
        }
        other => hash_value(&mut hasher, other, skip),
    }
    hasher.finalize().into()
}

/// Adds `extra` to a digest (the exact text of a semantic entry, its guard words).
pub fn extend(digest: &Digest32, extra: &[&str]) -> Digest32 {
    let mut hasher = Sha256::new();
    hasher.update(digest);
    for part in extra {
        hash_str(&mut hasher, part);
    }
    hasher.finalize().into()
}

fn hash_str(hasher: &mut Sha256, text: &str) {
    hasher.update((text.len() as u64).to_le_bytes());
    hasher.update(text.as_bytes());
}

/// Type-tagged and length-prefixed, so no two different documents feed the same bytes.
fn hash_value(hasher: &mut Sha256, value: &Value, skip: Option<*const Value>) {
    if skip == Some(value as *const Value) {
        hasher.update([b'?']);
        return;
    }
    match value {
        Value::Null => hasher.update([b'n']),
        Value::Bool(b) => hasher.update([if *b { b't' } else { b'f' }]),
        Value::Number(n) => {
            hasher.update([b'#']);
            // 1 and 1.0 are the same number to a model server.
            match n.as_f64() {
                Some(f) if f.fract() == 0.0 && f.abs() < 1e15 => hash_str(hasher, &(f as i64).to_string()),
                _ => hash_str(hasher, &n.to_string()),
            }
        }
        Value::String(s) => {
            hasher.update([b'"']);
            hash_str(hasher, s);
        }
        Value::Array(items) => {
            hasher.update([b'[']);
            hasher.update((items.len() as u64).to_le_bytes());
            for item in items {
                hash_value(hasher, item, skip);
            }
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            hasher.update([b'{']);
            hasher.update((keys.len() as u64).to_le_bytes());
            for key in keys {
                hash_str(hasher, key);
                hash_value(hasher, &map[key], skip);
            }
        }
    }
}

/// Which words must agree, in order, for a semantic hit.
#[derive(Debug, Clone)]
pub struct GuardWords {
    /// Words with a digit ("10", "3pm", "A320").
    pub numbers: bool,
    /// Capitalised words other than the first of a sentence (names: "Paris", "IBM"), compared
    /// case-insensitively.
    pub capitalized: bool,
    /// Negation words, lower case; any word ending in "n't" counts too (none when the list is
    /// empty). Every negation is the same guard word, so "don't" matches "do not".
    pub negations: Vec<String>,
}

/// The guard words of `text`, in order, as one string (`#` separated): numbers as written,
/// names lower-cased, every negation as `¬`.
pub fn guard_words(text: &str, guard: &GuardWords) -> String {
    let mut out = String::new();
    let mut sentence_start = true;
    let push = |out: &mut String, word: &str| {
        if !out.is_empty() {
            out.push('#');
        }
        out.push_str(word);
    };
    // Words are runs of letters, digits and apostrophes; anything else separates them.
    let mut rest = text;
    while !rest.is_empty() {
        let start = rest.find(|c: char| c.is_alphanumeric()).unwrap_or(rest.len());
        if rest[..start].contains(['.', '!', '?', '\n']) {
            sentence_start = true;
        }
        rest = &rest[start..];
        let end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '’'))
            .unwrap_or(rest.len());
        let word = rest[..end].trim_end_matches(['\'', '’']);
        rest = &rest[end..];
        if word.is_empty() {
            continue;
        }
        let lower = word.to_lowercase();
        let first = std::mem::replace(&mut sentence_start, false);
        if guard.numbers && word.chars().any(|c| c.is_numeric()) {
            push(&mut out, word);
        } else if !guard.negations.is_empty()
            && (lower.ends_with("n't") || lower.ends_with("n’t") || guard.negations.contains(&lower))
        {
            push(&mut out, "¬");
        } else if guard.capitalized && !first && word != "I" && word.chars().next().is_some_and(char::is_uppercase) {
            push(&mut out, &lower);
        }
    }
    out
}

/// The default negation words (English).
pub fn default_negations() -> Vec<String> {
    [
        "not",
        "no",
        "never",
        "none",
        "nobody",
        "nothing",
        "neither",
        "nor",
        "nowhere",
        "without",
        "cannot",
        "dont",
        "doesnt",
        "didnt",
        "isnt",
        "arent",
        "wasnt",
        "werent",
        "wont",
        "cant",
        "shouldnt",
        "wouldnt",
        "couldnt",
        "except",
        "excluding",
        "avoid",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn words(text: &str) -> String {
        guard_words(
            text,
            &GuardWords {
                numbers: true,
                capitalized: true,
                negations: default_negations(),
            },
        )
    }

    #[test]
    fn guard_words_keep_numbers_names_and_negations_in_order() {
        assert_eq!(words("Flights from London to Paris"), "london#paris");
        assert_eq!(words("flights from Paris to London"), "paris#london");
        assert_eq!(words("I want 2 tickets for 10am"), "2#10am");
        assert_eq!(words("I don't want onions"), "¬");
        assert_eq!(words("I do not want onions"), "¬");
        assert_eq!(words("I want onions"), "");
        assert_eq!(words("What is the capital of France? Tell me."), "france");
        assert_eq!(words("what's the capital of France"), "france");
    }

    #[test]
    fn digests_ignore_key_order_and_caller_fields_but_not_values() {
        let a =
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.0, "user": "u1"});
        let b = json!({"user": "u2", "temperature": 0, "messages": [{"content": "hi", "role": "user"}], "model": "m"});
        let c = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 0.5});
        assert_eq!(
            request_digest("/v1", &[], &a, None),
            request_digest("/v1", &[], &b, None)
        );
        assert_ne!(
            request_digest("/v1", &[], &a, None),
            request_digest("/v1", &[], &c, None)
        );
        assert_ne!(
            request_digest("/v1", &[], &a, None),
            request_digest("/v2", &[], &a, None)
        );
        let tenant = |t: &str| request_digest("/v1", &[Some(t.into())], &a, None);
        assert_ne!(tenant("a"), tenant("b"));
        assert_ne!(
            request_digest("/v1", &[None], &a, None),
            request_digest("/v1", &[Some(String::new())], &a, None)
        );
        // The skipped value (the last user message) does not count; everything else does.
        let d = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}], "temperature": 0.0});
        let skip = |doc: &Value| request_digest("/v1", &[], doc, Some(&doc["messages"][0]["content"]));
        assert_eq!(skip(&a), skip(&d));
    }
}
