//! International bank account numbers: a country code with its registered IBAN length, two
//! check digits, then the account part, written plain or in groups of four; mod-97 must be 1.

use super::{Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes IBANs.
#[derive(Debug, Default)]
pub struct Iban;

/// IBAN length per country (the SWIFT IBAN registry).
#[rustfmt::skip]
const LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AD", 24),
    (b"AE", 23),
    (b"AL", 28),
    (b"AT", 20),
    (b"AZ", 28),
    (b"BA", 20),
    (b"BE", 16),
    (b"BG", 22),
    (b"BH", 22),
    (b"BI", 27),
    (b"BR", 29),
    (b"BY", 28),
    (b"CH", 21),
    (b"CR", 22),
    (b"CY", 28),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DJ", 27),
    (b"DK", 18),
    (b"DO", 28),
    (b"EE", 20),
    (b"EG", 29),
    (b"ES", 24),
    (b"FI", 18),
    (b"FK", 18),
    (b"FO", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GE", 22),
    (b"GI", 23),
    (b"GL", 18),
    (b"GR", 27),
    (b"GT", 28),
    (b"HN", 28),
    (b"HR", 21),
    (b"HU", 28),
    (b"IE", 22),
    (b"IL", 23),
    (b"IQ", 23),
    (b"IS", 26),
    (b"IT", 27),
    (b"JO", 30),
    (b"KW", 30),
    (b"KZ", 20),
    (b"LB", 28),
    (b"LC", 32),
    (b"LI", 21),
    (b"LT", 20),
    (b"LU", 20),
    (b"LV", 21),
    (b"LY", 25),
    (b"MC", 27),
    (b"MD", 24),
    (b"ME", 22),
    (b"MK", 19),
    (b"MN", 20),
    (b"MR", 27),
    (b"MT", 31),
    (b"MU", 30),
    (b"NI", 28),
    (b"NL", 18),
    (b"NO", 15),
    (b"OM", 23),
    (b"PK", 24),
    (b"PL", 28),
    (b"PS", 29),
    (b"PT", 25),
    (b"QA", 29),
    (b"RO", 24),
    (b"RS", 22),
    (b"RU", 33),
    (b"SA", 24),
    (b"SC", 31),
    (b"SD", 18),
    (b"SE", 24),
    (b"SI", 19),
    (b"SK", 24),
    (b"SM", 27),
    (b"SO", 23),
    (b"ST", 25),
    (b"SV", 28),
    (b"TL", 23),
    (b"TN", 24),
    (b"TR", 26),
    (b"UA", 29),
    (b"VA", 22),
    (b"VG", 24),
    (b"XK", 20),
    (b"YE", 30),
];

/// The IBAN check: move the first four characters to the end, letters become 10..35, mod 97 == 1.
pub(crate) fn mod97(iban: &[u8]) -> bool {
    let rotated = iban[4..].iter().chain(&iban[..4]);
    let mut rest: u32 = 0;
    for &c in rotated {
        let value = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rest = if value >= 10 {
            (rest * 100 + value) % 97
        } else {
            (rest * 10 + value) % 97
        };
    }
    rest == 1
}

impl Recognizer for Iban {
    fn entity(&self) -> Entity {
        Entity::Iban
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        let bytes = text.as_bytes();
        let mut compact = Vec::with_capacity(34);
        let mut resume = 0;
        // Candidates are number runs glued to two capitals: `GB82 WEST ...`, `DE8937...`.
        for run in scan.runs() {
            let Some(start) = run.span.start.checked_sub(2) else {
                continue;
            };
            if start < resume
                || !run.glued_before
                || !bytes[start].is_ascii_uppercase()
                || !bytes[start + 1].is_ascii_uppercase()
                || !bytes.get(start + 3).is_some_and(u8::is_ascii_digit)
                || (start > 0 && bytes[start - 1].is_ascii_alphanumeric())
            {
                continue;
            }
            let country = [bytes[start], bytes[start + 1]];
            let Some(&(_, length)) = LENGTHS.iter().find(|(code, _)| **code == country) else {
                continue;
            };
            // Collect `length` alphanumerics, allowing one separator kind (a space, a dash or a
            // dot), single, between groups.
            compact.clear();
            let mut separator = None;
            let mut end = start;
            while end < bytes.len() && compact.len() < length {
                let b = bytes[end];
                if b.is_ascii_digit() || b.is_ascii_uppercase() {
                    compact.push(b);
                } else if matches!(b, b' ' | b'-' | b'.')
                    && end > start
                    && bytes[end - 1].is_ascii_alphanumeric()
                    && *separator.get_or_insert(b) == b
                {
                    // A separator between groups.
                } else {
                    break;
                }
                end += 1;
            }
            let boundary = end == bytes.len() || !bytes[end].is_ascii_alphanumeric();
            if compact.len() == length && boundary && mod97(&compact) {
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
    fn finds_valid_ibans_plain_and_grouped() {
        let cases: &[(&str, &[&str])] = &[
            (
                "pay GB82 WEST 1234 5698 7654 32 today",
                &["GB82 WEST 1234 5698 7654 32"],
            ),
            ("DE89370400440532013000.", &["DE89370400440532013000"]),
            ("FR1750177548659716638049837", &["FR1750177548659716638049837"]),
            ("GB82 WEST 1234 5698 7654 33", &[]), // fails mod-97
            ("DE8937040044053201300", &[]),       // one short
            ("DE893704004405320130001", &[]),     // one long
            ("XX89370400440532013000", &[]),      // no such country
            ("SKU AB12 CD34 and ID US1234", &[]),
            (
                "GB82-WEST-1234-5698-7654-32 and DE89.3704.0044.0532.0130.00",
                &["GB82-WEST-1234-5698-7654-32", "DE89.3704.0044.0532.0130.00"],
            ),
            (
                "GB82 WEST 1234 5698 7654 32 DE89 3704 0044 0532 0130 00\nFR1750177548659716638049837",
                &[
                    "GB82 WEST 1234 5698 7654 32",
                    "DE89 3704 0044 0532 0130 00",
                    "FR1750177548659716638049837",
                ],
            ),
            ("GB82-WEST 1234-5698 7654 32", &[]), // mixed separators
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&Iban, text), expected, "{text}");
        }
    }
}
