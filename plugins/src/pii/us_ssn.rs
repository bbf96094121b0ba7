//! US social security numbers written `AAA-GG-SSSS` or `AAA GG SSSS`, excluding numbers the
//! SSA never issues: area 000, 666 or 900-999, group 00, serial 0000.

use super::{digit_groups, Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes US social security numbers.
#[derive(Debug, Default)]
pub struct UsSsn;

impl Recognizer for UsSsn {
    fn entity(&self) -> Entity {
        Entity::UsSsn
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        for run in scan.number_runs(9, 9) {
            // `(123-45-6789)`: the run starts at the parenthesis.
            let candidate = text[run.clone()].trim_start_matches('(');
            let start = run.end - candidate.len();
            if digit_groups(candidate) != [3, 2, 4] || !candidate.as_bytes()[0].is_ascii_digit() {
                continue;
            }
            let separator = candidate.as_bytes()[3];
            if !matches!(separator, b'-' | b' ') || candidate.as_bytes()[6] != separator {
                continue;
            }
            let area: u32 = candidate[0..3].parse().unwrap_or(0);
            let group: u32 = candidate[4..6].parse().unwrap_or(0);
            let serial: u32 = candidate[7..11].parse().unwrap_or(0);
            if area == 0 || area == 666 || area >= 900 || group == 0 || serial == 0 {
                continue;
            }
            found.push(start..run.end);
        }
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
            ("call 415-555-0100", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&UsSsn, text), expected, "{text}");
        }
    }
}
