//! IP addresses: dotted IPv4 with octets up to 255 and no leading zeros (not a version such
//! as `v1.2.3.4` or part of a longer dotted number), and IPv6 in every RFC 4291/5952 text
//! form (compressed, loopback `::1`, IPv4-mapped `::ffff:192.0.2.1`), standing alone as a
//! word, with a CIDR suffix (`10.0.0.0/8`, `fe80::/10`) or an RFC 6874 zone id (`%eth0`)
//! taken along.

use super::{lower_before, Entity, Recognizer, Text};
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

/// The length of a CIDR suffix `/n` (n up to `max`) right after `end`, or 0.
fn prefix_length_after(bytes: &[u8], end: usize, max: u32) -> usize {
    if bytes.get(end) != Some(&b'/') {
        return 0;
    }
    let digits = bytes[end + 1..]
        .iter()
        .take(4)
        .take_while(|b| b.is_ascii_digit())
        .count();
    let value = std::str::from_utf8(&bytes[end + 1..end + 1 + digits])
        .ok()
        .and_then(|d| d.parse::<u32>().ok());
    match value {
        Some(n)
            if (1..=3).contains(&digits) && n <= max && !bytes.get(end + 1 + digits).is_some_and(|b| is_word(*b)) =>
        {
            1 + digits
        }
        _ => 0,
    }
}

/// The length of an IPv6 zone id `%eth0` right after `end`, or 0.
fn zone_after(bytes: &[u8], end: usize) -> usize {
    if bytes.get(end) != Some(&b'%') {
        return 0;
    }
    let zone = bytes[end + 1..]
        .iter()
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        .count();
    if zone == 0 {
        0
    } else {
        1 + zone
    }
}

/// `version 4.15.5.84`, `v1.2.3.4`: a four-part version number, not an address.
fn after_version_word(text: &str, start: usize) -> bool {
    let before = lower_before(text, start, 12);
    let before = before.trim_end();
    ["version", "ver", "ver.", "release", "build", "v", "firmware", "fw"]
        .iter()
        .any(|word| {
            before.ends_with(word)
                && !before[..before.len() - word.len()].ends_with(|c: char| c.is_ascii_alphanumeric())
        })
}

fn find_ipv4(scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
    let text = scan.as_str();
    for run in scan.runs() {
        if run.digits < 4 || run.glued_before || run.glued_after || !text[run.span.clone()].contains('.') {
            continue;
        }
        if after_version_word(text, run.span.start) {
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
                found.push(piece_start..piece_end + prefix_length_after(text.as_bytes(), piece_end, 32));
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
        let suffix = zone_after(bytes, end) + prefix_length_after(bytes, end + zone_after(bytes, end), 128);
        // One group is enough for the loopback address and for a compressed address with a
        // prefix or zone (`fe80::/10`, `fe80::%eth0`); text without a digit (`a::b`) is code.
        let enough = hex_groups >= 2 || candidate == "::1" || (hex_groups == 1 && suffix > 0);
        let has_digit = candidate.bytes().any(|b| b.is_ascii_digit());
        if !glued && colons >= 2 && enough && has_digit && candidate.parse::<Ipv6Addr>().is_ok() {
            found.push(start..end + suffix);
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
            (
                "loopback ::1, link-local fe80::/10 and fe80::1ff:fe23:4567:890a%eth0",
                &["::1", "fe80::/10", "fe80::1ff:fe23:4567:890a%eth0"],
            ),
            (
                "subnets 10.0.0.0/8 and 2001:db8::/32.",
                &["10.0.0.0/8", "2001:db8::/32"],
            ),
            ("mapped ::ffff:192.0.2.128 ok", &["::ffff:192.0.2.128"]),
            ("[2001:db8::1]:8080 and 10.1.2.3:443", &["2001:db8::1", "10.1.2.3"]),
            ("Foo::Bar and a::b and 10.0.0.0/99", &["10.0.0.0"]),
            ("Version 4.15.5.84 and firmware 2.1.0.7", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&IpAddress, text), expected, "{text}");
        }
    }
}
