//! Payment card numbers: 13 to 19 digits, written plain or in groups of 4 (Amex 4-6-5,
//! Diners 4-6-4), with a known issuer prefix, passing the Luhn check.

use super::{digit_groups, digits_of, Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes payment card numbers.
#[derive(Debug, Default)]
pub struct CreditCard;

/// The Luhn checksum over `digits` is valid.
pub(crate) fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let doubled = d * 2;
                if doubled > 9 {
                    doubled - 9
                } else {
                    doubled
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

fn known_issuer(digits: &[u8]) -> bool {
    let prefix = |n: usize| digits[..n].iter().fold(0u32, |acc, &d| acc * 10 + u32::from(d));
    let len = digits.len();
    match digits[0] {
        4 => matches!(len, 13 | 16 | 19),                     // Visa
        5 => (51..=55).contains(&prefix(2)) && len == 16,     // Mastercard
        2 => (2221..=2720).contains(&prefix(4)) && len == 16, // Mastercard 2-series
        3 => match prefix(2) {
            34 | 37 => len == 15,                                               // Amex
            36 | 38 | 39 => (14..=19).contains(&len),                           // Diners
            35 => (16..=19).contains(&len),                                     // JCB
            30 => (300..=305).contains(&prefix(3)) && (14..=19).contains(&len), // Diners
            _ => false,
        },
        6 => {
            (prefix(4) == 6011 || prefix(2) == 65 || (644..=649).contains(&prefix(3)) || prefix(2) == 62)
                && (16..=19).contains(&len)
        } // Discover, UnionPay
        _ => false,
    }
}

fn card_grouping(groups: &[usize]) -> bool {
    matches!(
        groups,
        [_] | [4, 4, 4, 4] | [4, 4, 4, 4, 3] | [4, 4, 4, 1] | [4, 6, 5] | [4, 6, 4] | [4, 4, 4, 2] | [4, 4, 4, 3]
    )
}

impl Recognizer for CreditCard {
    fn entity(&self) -> Entity {
        Entity::CreditCard
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        for run in scan.number_runs(13, 19) {
            let candidate = text[run.clone()].trim_start_matches(['+', '(']);
            let start = run.end - candidate.len();
            // One separator kind only, and only spaces or dashes.
            let separators: Vec<char> = candidate.chars().filter(|c| !c.is_ascii_digit()).collect();
            if separators
                .iter()
                .any(|c| *c != separators[0] || !matches!(c, ' ' | '-'))
            {
                continue;
            }
            let digits = digits_of(candidate);
            if (13..=19).contains(&digits.len())
                && card_grouping(&digit_groups(candidate))
                && known_issuer(&digits)
                && luhn(&digits)
            {
                found.push(start..run.end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pii::found;

    #[test]
    fn finds_valid_cards_only() {
        let cases: &[(&str, &[&str])] = &[
            ("card 4111 1111 1111 1111 exp", &["4111 1111 1111 1111"]),
            ("4111-1111-1111-1111", &["4111-1111-1111-1111"]),
            ("amex 378282246310005.", &["378282246310005"]),
            ("amex 3782 822463 10005", &["3782 822463 10005"]),
            (
                "mc 5555555555554444 and 2223003122003222",
                &["5555555555554444", "2223003122003222"],
            ),
            ("4111 1111 1111 1112", &[]),             // fails Luhn
            ("order 1234567812345670", &[]),          // Luhn-valid, no issuer
            ("4111 1111-1111 1111", &[]),             // mixed separators
            ("41111 11111 11111 1", &[]),             // odd grouping
            ("tracking 4111111111111111111111", &[]), // too long
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&CreditCard, text), expected, "{text}");
        }
    }
}
