//! US social security numbers written `AAA-GG-SSSS`, `AAA GG SSSS`, `AAA.GG.SSSS` or
//! `AAA/GG/SSSS` (one separator kind), or as nine plain digits right after an SSN word,
//! excluding numbers the SSA never issues: area 000, 666 or 900-999, group 00, serial 0000.
//! Context words are extra evidence, never required for the separated forms.

use super::{digit_groups, lower_before, Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes US social security numbers.
#[derive(Debug, Default)]
pub struct UsSsn;

/// Words that make nine plain digits an SSN.
const SSN_CONTEXT: &[&str] = &["ssn", "social security", "social sec", "ss#", "ss #"];

fn issued(area: u32, group: u32, serial: u32) -> bool {
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

fn in_context(text: &str, start: usize) -> bool {
    let before = lower_before(text, start, 32);
    SSN_CONTEXT.iter().any(|word| before.contains(word))
}

fn is_ssn(text: &str, span: Range<usize>) -> Option<Range<usize>> {
    let candidate = text[span.clone()].trim_start_matches('(');
    let start = span.end - candidate.len();
    let bytes = candidate.as_bytes();
    if !bytes[0].is_ascii_digit() {
        return None;
    }
    let digits: String = match digit_groups(candidate).as_slice() {
        [3, 2, 4] => {
            let separator = bytes[3];
            if !matches!(separator, b'-' | b' ' | b'.' | b'/') || bytes[6] != separator {
                return None;
            }
            candidate.bytes().filter(u8::is_ascii_digit).map(char::from).collect()
        }
        [9] if in_context(text, start) => candidate.to_string(),
        _ => return None,
    };
    let area: u32 = digits[0..3].parse().ok()?;
    let group: u32 = digits[3..5].parse().ok()?;
    let serial: u32 = digits[5..9].parse().ok()?;
    issued(area, group, serial).then_some(start..span.end)
}

impl Recognizer for UsSsn {
    fn entity(&self) -> Entity {
        Entity::UsSsn
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        scan.values_in_runs(9..=9, 3, found, |span| is_ssn(text, span));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pii::found;

    #[test]
    fn finds_issued_numbers_only() {
        let cases: &[(&str, &[&str])] = &[
            ("ssn 259-09-7319.", &["259-09-7319"]),
            ("012 51 5549", &["012 51 5549"]),
            ("Seth (215-37-2970) asked", &["215-37-2970"]),
            ("000-12-3456 666-12-3456 912-12-3456", &[]),
            ("123-00-4567 123-45-0000", &[]),
            ("123-45 6789 and 123456789", &[]),
            ("259.09.7319 and 259/09/7319", &["259.09.7319", "259/09/7319"]),
            ("SSN: 259097319", &["259097319"]),
            ("user_858 (473-15-8188)", &["473-15-8188"]),
            (
                "259-09-7319 215-37-2970\n473 15 8188",
                &["259-09-7319", "215-37-2970", "473 15 8188"],
            ),
            ("call 415-555-0100", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&UsSsn, text), expected, "{text}");
        }
    }
}
