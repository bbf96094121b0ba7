//! E-mail addresses: every `@` is a candidate; the address around it must have a plausible
//! local part and a domain of valid labels ending in a top-level domain of letters or a
//! punycode `xn--` label. Internationalised addresses (RFC 6531: letters of any script in
//! the local part and the domain) and quoted local parts (`"john doe"@example.com`) count.

use super::{Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes e-mail addresses.
#[derive(Debug, Default)]
pub struct Email;

fn is_local(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, '.' | '_' | '%' | '+' | '-' | '\'' | '=' | '!' | '~')
        || (!c.is_ascii() && c.is_alphanumeric())
}

fn is_domain(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '-') || (!c.is_ascii() && c.is_alphanumeric())
}

fn valid_domain(domain: &str) -> bool {
    let labels: Vec<&str> = domain.split('.').collect();
    let Some(tld) = labels.last() else { return false };
    let tld_ok = (tld.chars().count() >= 2 && tld.chars().all(char::is_alphabetic))
        || (tld.len() > 4 && tld.starts_with("xn--") && tld.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    labels.len() >= 2
        && tld_ok
        && labels
            .iter()
            .all(|label| !label.is_empty() && label.len() <= 63 && !label.starts_with('-') && !label.ends_with('-'))
}

/// Where the local part before `at` starts, if there is one.
fn local_start(text: &str, from: usize, at: usize) -> Option<usize> {
    let before = &text[from..at];
    if let Some(inner) = before.strip_suffix('"') {
        // A quoted local part: printable text without quotes or line breaks.
        let open = inner.rfind(['"', '\n'])?;
        let quoted = &inner[open + 1..];
        return (inner.as_bytes()[open] == b'"' && !quoted.is_empty() && quoted.len() <= 62).then_some(from + open);
    }
    let mut start = at;
    for (index, c) in before.char_indices().rev() {
        if !is_local(c) {
            break;
        }
        start = from + index;
    }
    while start < at && matches!(text.as_bytes()[start], b'.' | b'\'') {
        start += 1;
    }
    let local = &text[start..at];
    (!local.is_empty() && local.len() <= 64 && !local.ends_with('.') && !local.contains("..")).then_some(start)
}

/// `password@host` of `scheme://user:password@host` is a URL's credentials, not an address.
fn userinfo_of_url(text: &str, start: usize) -> bool {
    let before = &text[..start];
    let token_start = before
        .rfind(|c: char| c.is_whitespace() || c == '"' || c == '\'')
        .map_or(0, |i| i + 1);
    let token = &before[token_start..];
    token
        .find("://")
        .is_some_and(|scheme| token[scheme + 3..].contains(':'))
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
            let Some(start) = local_start(text, resume, at) else {
                continue;
            };
            if userinfo_of_url(text, start) {
                continue;
            }
            let mut end = at + 1;
            for (index, c) in text[at + 1..].char_indices() {
                if !is_domain(c) {
                    break;
                }
                end = at + 1 + index + c.len_utf8();
            }
            // A sentence may end right after the address.
            while end > at + 1 && matches!(bytes[end - 1], b'.' | b'-') {
                end -= 1;
            }
            if valid_domain(&text[at + 1..end]) {
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
            ("write to josé.garcía@correo.es", &["josé.garcía@correo.es"]),
            (
                "用户@例子.中国 or пример@почта.рф",
                &["用户@例子.中国", "пример@почта.рф"],
            ),
            ("puny user@xn--bcher-kva.xn--p1ai.", &["user@xn--bcher-kva.xn--p1ai"]),
            ("quoted \"john doe\"@example.com here", &["\"john doe\"@example.com"]),
            ("a@b.c and x@xn--.com", &[]),
            ("https://user:password@example.com/path", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&Email, text), expected, "{text}");
        }
    }
}
