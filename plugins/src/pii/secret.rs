//! Credentials: AWS access key ids, OpenAI/Anthropic-style `sk-` keys, Stripe keys, GitHub
//! and GitLab tokens, Slack tokens, Google API keys, JWTs and PEM private key blocks. One
//! literal automaton finds every known prefix in a single pass; each hit is then checked
//! against the full format, anchored where the prefix starts.

use super::{Entity, Recognizer, Text};
use aho_corasick::{AhoCorasick, MatchKind};
use regex::Regex;
use std::ops::Range;

/// Prefix and the anchored format of the whole token.
const FORMATS: &[(&str, &str)] = &[
    ("AKIA", r"^AKIA[0-9A-Z]{16}"),
    ("ASIA", r"^ASIA[0-9A-Z]{16}"),
    ("sk-", r"^sk-[A-Za-z0-9_\-]{20,}"),
    ("sk_live_", r"^sk_live_[0-9A-Za-z]{16,}"),
    ("sk_test_", r"^sk_test_[0-9A-Za-z]{16,}"),
    ("rk_live_", r"^rk_live_[0-9A-Za-z]{16,}"),
    ("ghp_", r"^ghp_[A-Za-z0-9]{36,}"),
    ("gho_", r"^gho_[A-Za-z0-9]{36,}"),
    ("ghu_", r"^ghu_[A-Za-z0-9]{36,}"),
    ("ghs_", r"^ghs_[A-Za-z0-9]{36,}"),
    ("ghr_", r"^ghr_[A-Za-z0-9]{36,}"),
    ("github_pat_", r"^github_pat_[A-Za-z0-9_]{22,}"),
    ("glpat-", r"^glpat-[A-Za-z0-9_\-]{20,}"),
    ("xoxb-", r"^xoxb-[A-Za-z0-9\-]{10,}"),
    ("xoxp-", r"^xoxp-[A-Za-z0-9\-]{10,}"),
    ("xoxa-", r"^xoxa-[A-Za-z0-9\-]{10,}"),
    ("AIza", r"^AIza[0-9A-Za-z_\-]{35}"),
    ("eyJ", r"^eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"),
    // A block without its end line (cut off, or still streaming) is taken to the end.
    (
        "-----BEGIN",
        r"^-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----(?s:.*?)(-----END ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----|\z)",
    ),
];

/// Recognizes credentials.
#[derive(Debug)]
pub struct Secret {
    prefixes: AhoCorasick,
    formats: Vec<Regex>,
}

impl Secret {
    /// Compiles the prefix automaton and the formats.
    pub fn new() -> Self {
        let prefixes = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(FORMATS.iter().map(|(prefix, _)| prefix))
            .expect("the built-in prefixes compile");
        let formats = FORMATS
            .iter()
            .map(|(_, format)| Regex::new(format).expect("the built-in formats compile"))
            .collect();
        Self { prefixes, formats }
    }
}

impl Default for Secret {
    fn default() -> Self {
        Self::new()
    }
}

impl Recognizer for Secret {
    fn entity(&self) -> Entity {
        Entity::Secret
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        let bytes = text.as_bytes();
        let mut resume = 0;
        for hit in self.prefixes.find_iter(text) {
            let start = hit.start();
            if start < resume || (start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_')) {
                continue;
            }
            if let Some(token) = self.formats[hit.pattern().as_usize()].find(&text[start..]) {
                let end = start + token.end();
                // A word glued to the end is a longer identifier, not this token.
                if !bytes.get(end).is_some_and(|b| b.is_ascii_alphanumeric()) || token.as_str().starts_with("-----") {
                    found.push(start..end);
                    resume = end;
                }
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
            ("key AKIAIOSFODNN7EXAMPLE.".into(), vec!["AKIAIOSFODNN7EXAMPLE"]),
            (
                "use sk-proj-abcdefghijklmnopqrstuvwx12".into(),
                vec!["sk-proj-abcdefghijklmnopqrstuvwx12"],
            ),
            (
                "sk-ant-api03-abcdefghijklmnopqrstuvwxyz".into(),
                vec!["sk-ant-api03-abcdefghijklmnopqrstuvwxyz"],
            ),
            (
                "ghp_abcdefghijklmnopqrstuvwxyz0123456789 x".into(),
                vec!["ghp_abcdefghijklmnopqrstuvwxyz0123456789"],
            ),
            (
                "AIzaSyA-1234567890abcdefghijklmnopqrstu".into(),
                vec!["AIzaSyA-1234567890abcdefghijklmnopqrstu"],
            ),
            (
                "xoxb-123456789012-abcdefghij".into(),
                vec!["xoxb-123456789012-abcdefghij"],
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
