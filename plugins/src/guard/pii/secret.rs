//! Credentials, from the token formats the providers document: AWS access key ids (and the
//! secret access key written next to one), OpenAI/Anthropic-style `sk-` keys, Stripe secret,
//! restricted and webhook keys, GitHub classic, fine-grained and app tokens, every GitLab
//! token prefix, every Slack token kind and webhook URL, Google, Hugging Face, npm, PyPI,
//! SendGrid, Twilio, DigitalOcean, Shopify, Databricks and other AI-provider keys, JWTs and PEM
//! private key blocks; then `api_key=`/`password:`/`Authorization: Bearer` assignments whose
//! value looks random, and user:password credentials in URLs.
//!
//! One literal automaton finds every known prefix and assignment word in a single pass; each
//! hit is then checked against the full format, anchored where it starts. Placeholders
//! (`xxxx`, `EXAMPLE`, `<your-key>`, `${TOKEN}`, repeated characters, low entropy) are not
//! secrets.

use super::{Entity, Recognizer, Text};
use aho_corasick::{AhoCorasick, MatchKind};
use regex::Regex;
use std::ops::Range;

/// What a literal hit starts.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Check {
    /// A token of a fixed format.
    Token,
    /// A token whose format alone admits words (`sk-learn-...`): its body must look random.
    RandomToken,
    /// An AWS access key id: a secret access key may follow or precede it.
    AwsKeyId,
}

/// Words in the name a value is assigned to (`OPENAI_API_KEY=`, `"client_secret":`) that make
/// the value a candidate.
const ASSIGNMENT_WORDS: &[&str] = &[
    "api_key",
    "apikey",
    "api-key",
    "secret",
    "token",
    "password",
    "passwd",
    "pwd",
    "access_key",
    "private_key",
    "credential",
];

/// Literal, what it starts, and the anchored format of the whole token.
#[rustfmt::skip]
const LITERALS: &[(&str, Check, &str)] = &[
    // AWS (IAM identifiers: long-term and temporary access keys).
    ("AKIA", Check::AwsKeyId, r"^AKIA[0-9A-Z]{16}"),
    ("ASIA", Check::AwsKeyId, r"^ASIA[0-9A-Z]{16}"),
    ("ABIA", Check::AwsKeyId, r"^ABIA[0-9A-Z]{16}"),
    ("ACCA", Check::AwsKeyId, r"^ACCA[0-9A-Z]{16}"),
    // OpenAI, Anthropic and other `sk-` keys.
    ("sk-", Check::RandomToken, r"^sk-[A-Za-z0-9_\-]{20,}"),
    // Stripe.
    ("sk_live_", Check::Token, r"^sk_live_[0-9A-Za-z]{16,}"),
    ("sk_test_", Check::Token, r"^sk_test_[0-9A-Za-z]{16,}"),
    ("rk_live_", Check::Token, r"^rk_live_[0-9A-Za-z]{16,}"),
    ("rk_test_", Check::Token, r"^rk_test_[0-9A-Za-z]{16,}"),
    ("whsec_", Check::Token, r"^whsec_[A-Za-z0-9+/=]{24,}"),
    // GitHub.
    ("ghp_", Check::Token, r"^ghp_[A-Za-z0-9]{36,}"),
    ("gho_", Check::Token, r"^gho_[A-Za-z0-9]{36,}"),
    ("ghu_", Check::Token, r"^ghu_[A-Za-z0-9]{36,}"),
    ("ghs_", Check::Token, r"^ghs_[A-Za-z0-9]{36,}"),
    ("ghr_", Check::Token, r"^ghr_[A-Za-z0-9]{36,}"),
    ("github_pat_", Check::Token, r"^github_pat_[A-Za-z0-9_]{22,}"),
    // GitLab (its documented token prefixes).
    ("glpat-", Check::Token, r"^glpat-[A-Za-z0-9_\-.]{20,}"),
    ("gldt-", Check::Token, r"^gldt-[A-Za-z0-9_\-]{20,}"),
    ("glrt-", Check::Token, r"^glrt-[A-Za-z0-9_\-.]{20,}"),
    ("glrtr-", Check::Token, r"^glrtr-[A-Za-z0-9_\-]{20,}"),
    ("glcbt-", Check::Token, r"^glcbt-[A-Za-z0-9_\-]{20,}"),
    ("glptt-", Check::Token, r"^glptt-[A-Za-z0-9_\-]{20,}"),
    ("glft-", Check::Token, r"^glft-[A-Za-z0-9_\-]{20,}"),
    ("glimt-", Check::Token, r"^glimt-[A-Za-z0-9_\-]{20,}"),
    ("glagent-", Check::Token, r"^glagent-[A-Za-z0-9_\-]{20,}"),
    ("glsoat-", Check::Token, r"^glsoat-[A-Za-z0-9_\-]{20,}"),
    ("glffct-", Check::Token, r"^glffct-[A-Za-z0-9_\-]{20,}"),
    ("gloas-", Check::Token, r"^gloas-[A-Za-z0-9_\-]{20,}"),
    ("glwt-", Check::Token, r"^glwt-[A-Za-z0-9_\-]{20,}"),
    ("GR1348941", Check::Token, r"^GR1348941[A-Za-z0-9_\-]{20,}"),
    // Slack (bot, user, app, refresh, configuration, session and client tokens; webhooks).
    ("xox", Check::Token, r"^xox(?:[abprscde]-[A-Za-z0-9%\-]{10,}|e\.xox[a-z]-[A-Za-z0-9\-]{10,})"),
    ("xapp-", Check::Token, r"^xapp-[A-Za-z0-9\-]{10,}"),
    ("hooks.slack.com/", Check::Token, r"^hooks\.slack\.com/(services|workflows|triggers)/[A-Za-z0-9_\-]+/[A-Za-z0-9_/\-]{8,}"),
    // Google.
    ("AIza", Check::Token, r"^AIza[0-9A-Za-z_\-]{35}"),
    ("GOCSPX-", Check::Token, r"^GOCSPX-[A-Za-z0-9_\-]{24,}"),
    ("ya29.", Check::Token, r"^ya29\.[0-9A-Za-z_\-]{20,}"),
    // Other services and AI providers.
    ("hf_", Check::Token, r"^hf_[A-Za-z]{34}"),
    ("npm_", Check::Token, r"^npm_[A-Za-z0-9]{36}"),
    ("pypi-AgE", Check::Token, r"^pypi-AgE[A-Za-z0-9_\-]{50,}"),
    ("SG.", Check::Token, r"^SG\.[A-Za-z0-9_\-]{22}\.[A-Za-z0-9_\-]{43}"),
    // DigitalOcean; its `doo_`/`dor_` OAuth prefixes start like "door" and would slow the scan.
    ("dop_v1_", Check::Token, r"^dop_v1_[a-f0-9]{64}"),
    ("shp", Check::Token, r"^shp(?:at|ss|ca|pa)_[a-fA-F0-9]{32}"),
    ("dapi", Check::Token, r"^dapi[a-f0-9]{32}"),
    ("gsk_", Check::RandomToken, r"^gsk_[A-Za-z0-9]{48}"),
    ("r8_", Check::RandomToken, r"^r8_[A-Za-z0-9]{37}"),
    ("xai-", Check::RandomToken, r"^xai-[A-Za-z0-9]{70,}"),
    ("pplx-", Check::RandomToken, r"^pplx-[A-Za-z0-9]{40,}"),
    ("lin_api_", Check::RandomToken, r"^lin_api_[A-Za-z0-9]{40}"),
    ("PMAK-", Check::Token, r"^PMAK-[a-f0-9]{24}-[a-f0-9]{34}"),
    ("AGE-SECRET-KEY-1", Check::Token, r"^AGE-SECRET-KEY-1[0-9A-Z]{58}"),
    ("eyJ", Check::Token, r"^eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),
    // A block without its end line (cut off, or still streaming) is taken to the end.
    (
        "-----BEGIN",
        Check::Token,
        r"^-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----(?s:.*?)(-----END ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----|\z)",
    ),
];

/// The letters and digits of `literal` before its first `_` or `-`, if that is where its
/// first word ends (`ghp_` → `ghp`, `sk_live_` → `sk`; `xox` and `-----BEGIN` have none).
fn first_word(literal: &[u8]) -> Option<&[u8]> {
    let end = literal.iter().position(|b| !b.is_ascii_alphanumeric())?;
    (end > 0 && matches!(literal[end], b'_' | b'-')).then_some(&literal[..end])
}

/// Recognizes credentials.
#[derive(Debug)]
pub struct Secret {
    /// Literals without a `_`/`-` after their first word (`AKIA`, `eyJ`, `-----BEGIN`): few,
    /// so the automaton keeps its fastest SIMD searcher.
    literals: AhoCorasick,
    /// The automaton's pattern number → index in [`LITERALS`].
    literal_index: Vec<usize>,
    /// Literals whose first word ends at a `_` or `-` (`ghp_`, `glpat-`, `sk-`): looked up by
    /// that word from each `_`/`-` of the text, which prose has few of. Most provider
    /// prefixes are of this kind; an automaton of all 52 literals cost 5x the instructions.
    by_first_word: Vec<(Vec<u8>, Vec<usize>)>,
    /// Bytes that start one of those words: most words before a `-` (`2024-09-30`,
    /// `well-known`) are turned away on their first byte.
    first_bytes: [bool; 256],
    formats: Vec<Option<Regex>>,
    assignment: Regex,
    aws_secret: Regex,
}

impl Secret {
    /// Compiles the literal automaton and the formats.
    pub fn new() -> Self {
        let mut by_first_word: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
        let mut first_bytes = [false; 256];
        let mut literal_index = Vec::new();
        for (index, (literal, _, _)) in LITERALS.iter().enumerate() {
            match first_word(literal.as_bytes()) {
                Some(word) => {
                    first_bytes[usize::from(word[0])] = true;
                    match by_first_word.iter_mut().find(|(known, _)| known == word) {
                        Some((_, indexes)) => indexes.push(index),
                        None => by_first_word.push((word.to_vec(), vec![index])),
                    }
                }
                None => literal_index.push(index),
            }
        }
        by_first_word.sort();
        let literals = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(literal_index.iter().map(|index| LITERALS[*index].0))
            .expect("the built-in literals compile");
        let formats = LITERALS
            .iter()
            .map(|(_, _, format)| {
                (!format.is_empty()).then(|| Regex::new(format).expect("the built-in formats compile"))
            })
            .collect();
        Self {
            literals,
            literal_index,
            by_first_word,
            first_bytes,
            formats,
            // After the word: the rest of an identifier (`OPENAI_API_KEY`, `db_password`), a
            // closing quote, `=`, `:`, `=>` or `:=`, an opening quote, then the value.
            assignment: Regex::new(
                r#"^[A-Za-z0-9_\-]{0,24}["']?\s{0,4}(?:=>|:=|=|:)\s{0,4}["'`]?([^\s"'`,;<>(){}\[\]]{8,200})"#,
            )
            .expect("the assignment format compiles"),
            aws_secret: Regex::new(r"(?:^|[^A-Za-z0-9/+=])([A-Za-z0-9/+]{40})(?:$|[^A-Za-z0-9/+=])")
                .expect("the AWS secret format compiles"),
        }
    }
}

impl Default for Secret {
    fn default() -> Self {
        Self::new()
    }
}

/// Shannon entropy of `value`, in bits per character.
fn entropy(value: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in value.bytes() {
        counts[usize::from(b)] += 1;
    }
    let len = value.len() as f64;
    counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = f64::from(*c) / len;
            -p * p.log2()
        })
        .sum()
}

/// Documentation values, template variables and filler.
fn placeholder(value: &str) -> bool {
    let lower = value.to_ascii_lowercase();
    const WORDS: &[&str] = &[
        "example",
        "xxxx",
        "your",
        "placeholder",
        "changeme",
        "change_me",
        "dummy",
        "redacted",
        "sample",
        "****",
        "...",
        "${",
        "{{",
        "<",
        "%s",
        "replace",
        "insert",
        "fake",
        "1234567890",
        "abcdef",
    ];
    let distinct = {
        let mut seen = [false; 256];
        value
            .bytes()
            .filter(|b| !std::mem::replace(&mut seen[usize::from(*b)], true))
            .count()
    };
    WORDS.iter().any(|word| lower.contains(word)) || distinct <= 3
}

/// The letter and digit classes (lower, upper, digit) present.
fn classes(value: &str) -> usize {
    let bytes = value.bytes();
    let mut seen = [false; 4];
    for b in bytes {
        let class = match b {
            b'a'..=b'z' => 0,
            b'A'..=b'Z' => 1,
            b'0'..=b'9' => 2,
            _ => 3,
        };
        seen[class] = class < 3;
    }
    seen.iter().filter(|s| **s).count()
}

/// A value a machine chose to be hard to guess: letters and digits, high entropy (a word
/// such as `Authorization` has no digit).
fn looks_random(value: &str) -> bool {
    let bits = entropy(value);
    !placeholder(value)
        && classes(value) >= 2
        && value.bytes().any(|b| b.is_ascii_digit())
        && bits >= 3.0
        && bits * value.len() as f64 >= 36.0
}

/// A password is shorter and less random than a key, but still not a word or a variable:
/// letters with digits or symbols.
fn looks_like_password(value: &str) -> bool {
    let letters = value.bytes().any(|b| b.is_ascii_alphabetic());
    let others = value.bytes().any(|b| !b.is_ascii_alphabetic());
    !placeholder(value) && letters && others && value.len() >= 8 && entropy(value) >= 2.5
}

/// Code that reads a secret, not a secret (`os.environ["KEY"]`, `process.env.TOKEN`).
fn reference(value: &str) -> bool {
    value.starts_with('$')
        || value.contains("env.")
        || value.contains("environ")
        || value.contains("getenv")
        || value.contains("secrets.")
        || value.ends_with(".")
}

impl Secret {
    fn token(&self, text: &str, start: usize, literal: usize, check: Check) -> Option<Range<usize>> {
        let bytes = text.as_bytes();
        let format = self.formats[literal].as_ref()?;
        let token = format.find(&text[start..])?;
        let end = start + token.end();
        let body = &token.as_str()[LITERALS[literal].0.len()..];
        // A word glued to the end is a longer identifier, not this token.
        let glued = bytes.get(end).is_some_and(|b| b.is_ascii_alphanumeric()) && !token.as_str().starts_with("-----");
        let fake = placeholder(body) || (check == Check::RandomToken && !looks_random(body));
        (!glued && !fake).then_some(start..end)
    }

    /// The value assigned to the name `word` that starts at `end`.
    fn assigned_value(&self, text: &str, word: &str, end: usize) -> Option<Range<usize>> {
        let captures = self.assignment.captures(&text[end..])?;
        let value = captures.get(1)?;
        let span = end + value.start()..end + value.end();
        let value = value.as_str().trim_end_matches(['.', '!', '?']);
        let span = span.start..span.start + value.len();
        let lower = word.to_ascii_lowercase();
        let ok = if lower.contains("pass") || lower.contains("pwd") {
            looks_like_password(value)
        } else {
            looks_random(value)
        };
        (ok && !reference(value)).then_some(span)
    }

    /// The credentials of an `Authorization:` header value starting at `end`: `Bearer <token>`,
    /// `Basic <base64>`, or a bare token.
    fn auth_value(text: &str, end: usize) -> Option<Range<usize>> {
        let mut start = end;
        let rest = text[start..].trim_start_matches(' ');
        start += text[start..].len() - rest.len();
        for scheme in ["Bearer ", "bearer ", "Basic ", "Token ", "token "] {
            if rest.starts_with(scheme) {
                start += scheme.len();
                break;
            }
        }
        let rest = &text[start..];
        let len = rest
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'/' | b'='))
            .count();
        let value = rest[..len].trim_end_matches('.');
        (value.len() >= 16 && looks_random(value) && !reference(value)).then_some(start..start + value.len())
    }

    /// `user:password@` after `scheme://` at `at`.
    fn url_credentials(text: &str, at: usize) -> Option<Range<usize>> {
        let bytes = text.as_bytes();
        if at == 0 || !bytes[at - 1].is_ascii_alphanumeric() {
            return None;
        }
        let start = at + 3;
        let userinfo = bytes[start..]
            .iter()
            .take(256)
            .take_while(|b| !b.is_ascii_whitespace() && !matches!(b, b'/' | b'@' | b'"' | b'\'' | b'<' | b'>'))
            .count();
        let end = start + userinfo;
        if bytes.get(end) != Some(&b'@') || !bytes.get(end + 1).is_some_and(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        let (user, password) = text[start..end].split_once(':')?;
        let fake = user.is_empty()
            || password.is_empty()
            || placeholder(password)
            || matches!(
                password.to_ascii_lowercase().as_str(),
                "password" | "pass" | "secret" | "pwd"
            );
        (!fake).then_some(start..end)
    }

    /// A 40-character AWS secret access key within a few lines of an access key id.
    fn aws_secret_near(&self, text: &str, key_id: &Range<usize>, found: &mut Vec<Range<usize>>) {
        let mut from = key_id.start.saturating_sub(300);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        let mut to = (key_id.end + 300).min(text.len());
        while !text.is_char_boundary(to) {
            to += 1;
        }
        for captures in self.aws_secret.captures_iter(&text[from..to]) {
            let value = captures.get(1).expect("the key is captured");
            let span = from + value.start()..from + value.end();
            if span.start >= key_id.end || span.end <= key_id.start {
                let key = value.as_str();
                if looks_random(key) && classes(key) >= 3 && entropy(key) >= 4.0 {
                    found.push(span);
                }
            }
        }
    }
}

impl Recognizer for Secret {
    fn entity(&self) -> Entity {
        Entity::Secret
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        let bytes = text.as_bytes();
        let from = found.len();
        let mut resume = 0;
        for hit in self.literals.find_iter(text) {
            let start = hit.start();
            let literal = self.literal_index[hit.pattern().as_usize()];
            let check = LITERALS[literal].1;
            let glued_before = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            if start < resume || glued_before {
                continue;
            }
            if let Some(span) = self.token(text, start, literal, check) {
                if check == Check::AwsKeyId {
                    self.aws_secret_near(text, &span, found);
                }
                resume = span.end;
                found.push(span);
            }
        }
        // Prefixes ending at a `_` or `-`: the word before each one names the candidates.
        let mut resume = 0;
        for at in memchr::memchr2_iter(b'_', b'-', bytes) {
            if at < resume || at == 0 {
                continue;
            }
            let mut start = at;
            while start > 0 && at - start < 16 && bytes[start - 1].is_ascii_alphanumeric() {
                start -= 1;
            }
            let glued_before = start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            if start == at || glued_before || !self.first_bytes[usize::from(bytes[start])] {
                continue;
            }
            let word = &bytes[start..at];
            let Ok(found_at) = self
                .by_first_word
                .binary_search_by(|(known, _)| known.as_slice().cmp(word))
            else {
                continue;
            };
            for &literal in &self.by_first_word[found_at].1 {
                if !bytes[start..].starts_with(LITERALS[literal].0.as_bytes()) {
                    continue;
                }
                if let Some(span) = self.token(text, start, literal, LITERALS[literal].1) {
                    resume = span.end;
                    found.push(span);
                    break;
                }
            }
        }
        // Assignments, headers and URLs all have a `=` or `:` (rare in prose): look there.
        for at in memchr::memchr2_iter(b'=', b':', bytes) {
            if bytes[at..].starts_with(b"://") {
                found.extend(Self::url_credentials(text, at));
                continue;
            }
            if at > 0 && bytes[at] == b'=' && matches!(bytes[at - 1], b':' | b'=') {
                continue; // `:=`, `==`: seen at the first byte
            }
            // The name before: quotes and spaces, then identifier characters.
            let mut name_end = at;
            while name_end > 0 && at - name_end < 4 && matches!(bytes[name_end - 1], b' ' | b'"' | b'\'') {
                name_end -= 1;
            }
            let mut name_start = name_end;
            while name_start > 0
                && name_end - name_start < 48
                && (bytes[name_start - 1].is_ascii_alphanumeric() || matches!(bytes[name_start - 1], b'_' | b'-'))
            {
                name_start -= 1;
            }
            if name_start == name_end {
                continue;
            }
            let name = &bytes[name_start..name_end];
            let has = |word: &str| {
                name.windows(word.len())
                    .any(|w| w.eq_ignore_ascii_case(word.as_bytes()))
            };
            if name.len() >= 13 && name[name.len() - 13..].eq_ignore_ascii_case(b"authorization") {
                found.extend(Self::auth_value(text, at + 1));
            } else if name.len() >= 3 && ASSIGNMENT_WORDS.iter().any(|word| has(word)) {
                found.extend(self.assigned_value(text, &text[name_start..name_end], name_start));
            }
        }
        // A secret key found next to its id may come before it: keep the spans in order.
        let mut spans = found.split_off(from);
        spans.sort_by_key(|span| span.start);
        let mut kept_end = 0;
        for span in spans {
            if span.start >= kept_end {
                kept_end = span.end;
                found.push(span);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pii::found;

    #[test]
    fn finds_each_token_format() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        let pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAAA=\n-----END RSA PRIVATE KEY-----";
        let cases: Vec<(String, Vec<&str>)> = vec![
            ("key AKIAZ3MHQ2XKJ4WV7PLN.".into(), vec!["AKIAZ3MHQ2XKJ4WV7PLN"]),
            // AWS documentation's example key and other placeholders are not secrets.
            ("key AKIAIOSFODNN7EXAMPLE.".into(), vec![]),
            ("api_key = \"xxxxxxxxxxxxxxxxxxxx\" and token: <your-token-here>".into(), vec![]),
            ("password: ${DB_PASSWORD} and API_KEY=os.environ['API_KEY']".into(), vec![]),
            ("sk-learn-is-a-machine-learning-library".into(), vec![]),
            // The secret access key next to its id.
            (
                "aws_access_key_id=AKIAZ3MHQ2XKJ4WV7PLN\naws_secret_access_key=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".into(),
                vec!["AKIAZ3MHQ2XKJ4WV7PLN", "q8Rz4LmT2vXw9Kp1Yb7Nc3Hd6Fg0Js5Ua8Ei2Oo4"],
            ),
            // Provider formats.
            (
                "gldt-Ab3dEf5hIj7kLm9nOp1q glrt-Zx8cVb6nMq4wEr2tYu0i GR1348941aB3cD5eF7gH9iJ1kL3mN".into(),
                vec!["gldt-Ab3dEf5hIj7kLm9nOp1q", "glrt-Zx8cVb6nMq4wEr2tYu0i", "GR1348941aB3cD5eF7gH9iJ1kL3mN"],
            ),
            (
                "xapp-1-A04QX7ZL2KP-6120394857261-9c4e7b1fa83d5062 and https://hooks.slack.com/services/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".into(),
                vec![
                    "xapp-1-A04QX7ZL2KP-6120394857261-9c4e7b1fa83d5062",
                    "hooks.slack.com/services/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",
                ],
            ),
            (
                "rk_live_4eC39HqLyjWDarjtT1zdp7dc github_pat_21QCvpmFO7274743415_HRWYlZpkpmVxKGmZRWFnTtqavz3685998449TtJhsEKGjFRYOYkmnPRZBiA".into(),
                vec![
                    "rk_live_4eC39HqLyjWDarjtT1zdp7dc",
                    "github_pat_21QCvpmFO7274743415_HRWYlZpkpmVxKGmZRWFnTtqavz3685998449TtJhsEKGjFRYOYkmnPRZBiA",
                ],
            ),
            // Assignments and headers with random-looking values.
            (
                "OPENAI_API_KEY=Zq3vT8mW1xR6kP9s and password: \"Tr0ub4dor&3x\"".into(),
                vec!["Zq3vT8mW1xR6kP9s", "Tr0ub4dor&3x"],
            ),
            (
                "Authorization: Bearer 9f8Kq2LmX4vT7wR1zP5n".into(),
                vec!["9f8Kq2LmX4vT7wR1zP5n"],
            ),
            ("the token: required and password: yes".into(), vec![]),
            // Credentials in URLs.
            (
                "postgres://admin:S3cr3tPa55@db.internal:5432/app and https://user:password@example.com".into(),
                vec!["admin:S3cr3tPa55"],
            ),
            (
                "use sk-proj-aGJJDJgaXMXqBVzENJEAYjol25".into(),
                vec!["sk-proj-aGJJDJgaXMXqBVzENJEAYjol25"],
            ),
            (
                "sk-ant-api03-ewvfMrwUkzSAGAVHTarBZVcKqz".into(),
                vec!["sk-ant-api03-ewvfMrwUkzSAGAVHTarBZVcKqz"],
            ),
            (
                "ghp_WHaiXSfEzzlyAirTzRSxjvvUNt2680962296 x".into(),
                vec!["ghp_WHaiXSfEzzlyAirTzRSxjvvUNt2680962296"],
            ),
            (
                "AIzaSyA-8791394858EfFjEjFfpPfIwnYOzYLIR".into(),
                vec!["AIzaSyA-8791394858EfFjEjFfpPfIwnYOzYLIR"],
            ),
            (
                "xoxb-470158282341-kKSYoitgLx".into(),
                vec!["xoxb-470158282341-kKSYoitgLx"],
            ),
            (format!("token {jwt} ok"), vec![jwt]),
            (format!("{pem}\nmore"), vec![pem]),
            (
                "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg".into(),
                vec!["-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBg"],
            ),
            ("task-sk-1 and sk-short and AKIA123 and ghp_short".into(), vec![]),
            ("-----BEGIN PUBLIC KEY-----\nMIIB".into(), vec![]),
            ("eyJhbGciOiJIUzI1NiJ9 alone".into(), vec![]),
        ];
        let secret = Secret::new();
        for (text, expected) in &cases {
            assert_eq!(&found(&secret, text), expected, "{text}");
        }
    }
}
