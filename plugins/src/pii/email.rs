//! E-mail addresses: every `@` is a candidate; the address around it must have a plausible
//! local part and a domain of valid labels ending in an alphabetic top-level domain.

use super::{Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes e-mail addresses.
#[derive(Debug, Default)]
pub struct Email;

fn is_local(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'%' | b'+' | b'-' | b'\'')
}

fn is_domain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-')
}

fn valid_domain(domain: &[u8]) -> bool {
    let labels: Vec<&[u8]> = domain.split(|b| *b == b'.').collect();
    let Some(tld) = labels.last() else { return false };
    labels.len() >= 2
        && tld.len() >= 2
        && tld.iter().all(u8::is_ascii_alphabetic)
        && labels
            .iter()
            .all(|label| !label.is_empty() && label.len() <= 63 && label[0] != b'-' && label[label.len() - 1] != b'-')
}

impl Recognizer for Email {
    fn entity(&self) -> Entity {
        Entity::Email
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        let bytes = text.as_bytes();
        let mut resume = 0;
        for at in memchr::memchr_iter(b'@', bytes) {
            if at < resume {
                continue;
            }
            let mut start = at;
            while start > resume && is_local(bytes[start - 1]) {
                start -= 1;
            }
            while start < at && matches!(bytes[start], b'.' | b'\'') {
                start += 1;
            }
            let mut end = at + 1;
            while end < bytes.len() && is_domain(bytes[end]) {
                end += 1;
            }
            // A sentence may end right after the address.
            while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
                end -= 1;
            }
            let local = &bytes[start..at];
            let ok = !local.is_empty()
                && local.len() <= 64
                && local[local.len() - 1] != b'.'
                && !local.windows(2).any(|pair| pair == b"..")
                && valid_domain(&bytes[at + 1..end]);
            if ok {
                found.push(start..end);
                resume = end;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pii::found;

    #[test]
    fn finds_addresses_and_skips_near_misses() {
        let cases: &[(&str, &[&str])] = &[
            ("mail john.doe+tag@example.co.uk.", &["john.doe+tag@example.co.uk"]),
            (
                "<a_b@sub-domain.example.org>, c@d.io",
                &["a_b@sub-domain.example.org", "c@d.io"],
            ),
            ("o'neil@example.com", &["o'neil@example.com"]),
            ("user@localhost", &[]),
            ("@handle and foo@ and @ alone", &[]),
            ("pkg@1.2.3 and x@y.c1", &[]),
            ("a..b@example.com", &[]),
            ("me@-bad.com", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&Email, text), expected, "{text}");
        }
    }
}
