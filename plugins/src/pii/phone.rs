//! Phone numbers: international (`+` or `00` then 8 to 15 digits) and the common national
//! layouts (North American `(415) 555-0100`, `415.555.0100`, `1-800-555-0100`; European
//! numbers with a leading trunk `0`), with an optional `x123` extension. A bare run of ten
//! digits counts only without an order/invoice/account-style word or `#` just before it.

use super::{digit_groups, Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes phone numbers.
#[derive(Debug, Default)]
pub struct Phone;

/// Words that make a bare number an identifier rather than a phone number.
#[rustfmt::skip]
const NOT_A_PHONE_BEFORE: &[&str] = &[
    "order", "invoice", "account", "acct", "tracking", "ticket", "ref", "id", "no.", "serial", "sku", "case", "#",
];

/// Words that make a bare number a phone number.
const PHONE_CONTEXT: &[&str] = &[
    "phone", "tel", "mobile", "cell", "call", "fax", "whatsapp", "sms", "text me",
];

/// The lower-cased text just before `start`.
fn words_before(text: &str, start: usize) -> String {
    let mut from = start.saturating_sub(24);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    text[from..start].to_ascii_lowercase()
}

/// A context word counts unless it is a mask tag such as `[PHONE]` (found by fuzzing: masking one
/// number must not turn the next into a phone number).
fn has_phone_context(before: &str) -> bool {
    PHONE_CONTEXT.iter().any(|word| {
        before
            .match_indices(word)
            .any(|(at, _)| !before[..at].ends_with('[') && !before[at + word.len()..].starts_with([']', ':']))
    })
}

fn looks_like_identifier(before: &str) -> bool {
    let last_word = before
        .trim_end_matches([' ', ':'])
        .rsplit([' ', '\n', '\t', '(', ','])
        .next()
        .unwrap_or_default();
    NOT_A_PHONE_BEFORE.iter().any(|word| last_word.ends_with(word))
}

fn national(candidate: &str, groups: &[usize]) -> bool {
    let first = candidate.trim_start_matches('(').as_bytes()[0];
    match groups {
        [3, 3, 4] | [1, 3, 3, 4] => true,
        [10] => true,
        [11] => first == b'1' || first == b'0',
        // European layouts: a trunk `0`, then 9 or 10 digits in groups of two or more.
        _ => {
            let total: usize = groups.iter().sum();
            first == b'0' && (10..=11).contains(&total) && groups.iter().all(|g| *g >= 2) && groups.len() <= 5
        }
    }
}

impl Recognizer for Phone {
    fn entity(&self) -> Entity {
        Entity::Phone
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        let bytes = text.as_bytes();
        for run in scan.number_runs(7, 16) {
            let candidate = &text[run.clone()];
            // Dates and versions: slashes, or dots mixed with other separators.
            let (mut dots, mut others) = (false, false);
            for b in candidate.bytes() {
                match b {
                    b'/' => others = true,
                    b'.' => dots = true,
                    b' ' | b'-' => others = true,
                    _ => {}
                }
            }
            if candidate.contains('/') || (dots && others) {
                continue;
            }
            let bare = !others && !dots && !candidate.contains(['(', ')']);
            // A bare number needs 9 to 12 digits (most prose numbers are shorter: years, ids).
            if bare && !candidate.starts_with('+') && !(9..=12).contains(&(candidate.len())) {
                continue;
            }
            let groups = digit_groups(candidate);
            let digits: usize = groups.iter().sum();
            let ok = if candidate.starts_with('+') {
                (8..=16).contains(&digits) && groups.len() <= 8
            } else if candidate.trim_start_matches('(').starts_with("00") && groups.len() > 1 {
                (10..=15).contains(&digits)
            } else if groups.len() == 1 {
                let before = words_before(text, run.start);
                // A bare number is a phone number by its length, or by what is said before it.
                let in_context = has_phone_context(&before) && (9..=12).contains(&digits);
                in_context || (national(candidate, &groups) && !looks_like_identifier(&before))
            } else {
                national(candidate, &groups)
            };
            if !ok {
                continue;
            }
            // Take an extension along: `x1234`.
            let mut end = run.end;
            if bytes.get(end) == Some(&b'x') {
                end += 1;
                while end < bytes.len() && bytes[end].is_ascii_digit() {
                    end += 1;
                }
            }
            found.push(run.start..end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pii::found;

    #[test]
    fn finds_common_layouts_and_skips_dates_orders_and_versions() {
        let cases: &[(&str, &[&str])] = &[
            ("call (591)341-7776 now", &["(591)341-7776"]),
            ("at 206.269.0743x9150.", &["206.269.0743x9150"]),
            ("+1-780-563-6083 or +14155550100", &["+1-780-563-6083", "+14155550100"]),
            ("001-537-640-6812x415", &["001-537-640-6812x415"]),
            ("mobile 5272868387", &["5272868387"]),
            (
                "phone number 33446877791 and (036)-4328977",
                &["33446877791", "(036)-4328977"],
            ),
            (
                "via +33 (0)4 22 70 12 06 or 01 81 44 11 17",
                &["+33 (0)4 22 70 12 06", "01 81 44 11 17"],
            ),
            ("Ortiz (001-570-579-8302x0541) asked", &["(001-570-579-8302x0541"]),
            (
                "+44(0)306 999 0495 and 0115 4960851",
                &["+44(0)306 999 0495", "0115 4960851"],
            ),
            ("+33 3 27 22 54 18", &["+33 3 27 22 54 18"]),
            ("order 5272868387", &[]),
            ("invoice #5272868387", &[]),
            ("on 2024-03-15 10:22:31", &[]),
            ("12/25/2023 and 1.2.3.4", &[]),
            ("version 10.4.2 build 2231", &[]),
            ("pi is 3.14159265", &[]),
            ("ssn 123-45-6789", &[]),
            // Regression (fuzz: pii_mask): a mask tag is not a context word.
            ("@[PHONE]:211111171:21", &[]),
            ("[PHONE:5f3a9c0e] 211111171", &[]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&Phone, text), expected, "{text}");
        }
    }
}
