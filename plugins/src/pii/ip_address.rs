//! IP addresses: dotted IPv4 with octets up to 255 and no leading zeros (not a version such
//! as `v1.2.3.4` or part of a longer dotted number), and IPv6 in any form the standard
//! library parses (compressed, mixed with IPv4), standing alone as a word.

use super::{Entity, Recognizer, Text};
use std::net::Ipv6Addr;
use std::ops::Range;

/// Recognizes IPv4 and IPv6 addresses.
#[derive(Debug, Default)]
pub struct IpAddress;

fn ipv4(candidate: &str) -> bool {
    let octets: Vec<&str> = candidate.split('.').collect();
    octets.len() == 4
        && octets.iter().all(|octet| {
            !octet.is_empty()
                && octet.len() <= 3
                && !(octet.len() > 1 && octet.starts_with('0'))
                && octet.parse::<u16>().is_ok_and(|value| value <= 255)
        })
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn find_ipv4(scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
    let text = scan.as_str();
    for run in scan.runs() {
        if run.digits < 4 || run.glued_before || run.glued_after || !text[run.span.clone()].contains('.') {
            continue;
        }
        // Separators other than dots split a run into candidates ("10.0.0.1-10.0.0.9").
        let mut piece_start = run.span.start;
        for (offset, b) in text[run.span.clone()].bytes().chain(std::iter::once(b' ')).enumerate() {
            if b.is_ascii_digit() || b == b'.' {
                continue;
            }
            let piece_end = run.span.start + offset;
            if piece_end > piece_start && ipv4(&text[piece_start..piece_end]) {
                found.push(piece_start..piece_end);
            }
            piece_start = piece_end + 1;
        }
    }
}

fn find_ipv6(text: &str, found: &mut Vec<Range<usize>>) {
    let bytes = text.as_bytes();
    let part = |b: u8| b.is_ascii_hexdigit() || b == b':' || b == b'.';
    let mut resume = 0;
    for colon in memchr::memchr_iter(b':', bytes) {
        if colon < resume {
            continue;
        }
        let mut start = colon;
        while start > 0 && part(bytes[start - 1]) {
            start -= 1;
        }
        let mut end = colon;
        while end < bytes.len() && part(bytes[end]) {
            end += 1;
        }
        resume = end;
        while end > start && bytes[end - 1] == b'.' {
            end -= 1;
        }
        let candidate = &text[start..end];
        let glued =
            start.checked_sub(1).is_some_and(|i| is_word(bytes[i])) || bytes.get(end).is_some_and(|b| is_word(*b));
        let colons = candidate.bytes().filter(|b| *b == b':').count();
        let hex_groups = candidate.split(':').filter(|group| !group.is_empty()).count();
        if !glued && colons >= 2 && hex_groups >= 2 && candidate.parse::<Ipv6Addr>().is_ok() {
            found.push(start..end);
        }
    }
}

impl Recognizer for IpAddress {
    fn entity(&self) -> Entity {
        Entity::IpAddress
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        let from = found.len();
        find_ipv4(scan, found);
        find_ipv6(text, found);
        // IPv4-mapped IPv6 contains an IPv4 address: keep the outer one.
        let mut spans: Vec<Range<usize>> = found.drain(from..).collect();
        spans.sort_by_key(|span| (span.start, std::cmp::Reverse(span.end)));
        let mut last_end = 0;
        for span in spans {
            if span.start >= last_end {
                last_end = span.end;
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
    fn finds_addresses_and_skips_versions_and_times() {
        let cases: &[(&str, &[&str])] = &[
            ("from 192.168.1.10.", &["192.168.1.10"]),
            ("hosts 10.0.0.1,255.255.255.0", &["10.0.0.1", "255.255.255.0"]),
            (
                "v6 2001:db8::8a2e:370:7334 and ::ffff:10.0.0.1",
                &["2001:db8::8a2e:370:7334", "::ffff:10.0.0.1"],
            ),
            (
                "27f5:2fa9:a117:511f:b8a6:1716:6831:15a8",
                &["27f5:2fa9:a117:511f:b8a6:1716:6831:15a8"],
            ),
            ("v1.2.3.4 and 1.2.3.4.5 and 256.1.1.1 and 01.2.3.4", &[]),
            ("at 10:22:31 on std::vector, mac 00:1A:2B:3C:4D:5E", &[]),
            ("version 2.14.3", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&IpAddress, text), expected, "{text}");
        }
    }
}
