//! PII recognizers for `pii-guard`: one per file behind [`Recognizer`]. Each finds candidates
//! cheaply (a byte scan or a literal automaton, never a regex over the whole text) and then
//! validates them (Luhn, mod-97, number ranges, address parsing), so precision stays high.

mod credit_card;
mod email;
mod iban;
mod ip_address;
mod phone;
mod secret;
mod us_ssn;

use serde::Deserialize;
use std::ops::Range;

pub use credit_card::CreditCard;
pub use email::Email;
pub use iban::Iban;
pub use ip_address::IpAddress;
pub use phone::Phone;
pub use secret::Secret;
pub use us_ssn::UsSsn;

/// A kind of personal or secret data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Entity {
    /// E-mail addresses.
    Email,
    /// Phone numbers (E.164 and common national formats).
    Phone,
    /// Payment card numbers passing the Luhn check.
    CreditCard,
    /// US social security numbers outside the never-issued ranges.
    UsSsn,
    /// International bank account numbers passing mod-97.
    Iban,
    /// IPv4 and IPv6 addresses.
    IpAddress,
    /// Credentials: cloud keys, provider API tokens, GitHub tokens, JWTs, PEM private keys.
    Secret,
}

impl Entity {
    /// Every built-in entity, in a fixed order.
    pub const ALL: [Entity; 7] = [
        Entity::Email,
        Entity::Phone,
        Entity::CreditCard,
        Entity::UsSsn,
        Entity::Iban,
        Entity::IpAddress,
        Entity::Secret,
    ];

    /// The name used in configs, stats and reports.
    pub fn name(self) -> &'static str {
        match self {
            Entity::Email => "email",
            Entity::Phone => "phone",
            Entity::CreditCard => "credit_card",
            Entity::UsSsn => "us_ssn",
            Entity::Iban => "iban",
            Entity::IpAddress => "ip_address",
            Entity::Secret => "secret",
        }
    }

    /// The recognizer of this entity.
    pub fn recognizer(self) -> Box<dyn Recognizer> {
        match self {
            Entity::Email => Box::new(Email),
            Entity::Phone => Box::new(Phone),
            Entity::CreditCard => Box::new(CreditCard),
            Entity::UsSsn => Box::new(UsSsn),
            Entity::Iban => Box::new(Iban),
            Entity::IpAddress => Box::new(IpAddress),
            Entity::Secret => Box::new(Secret::new()),
        }
    }
}

/// Finds one kind of value in text.
pub trait Recognizer: Send + Sync {
    /// The kind of value found.
    fn entity(&self) -> Entity;
    /// Appends the byte ranges of the values found in `text`, in order, not overlapping.
    fn find(&self, text: &str, found: &mut Vec<Range<usize>>);
}

/// Maximal runs of "number-ish" text: digits with the separators phone, card and SSN formats
/// use (space, `-`, `.`, `(`, `)`, `/`, a leading `+`), starting and ending on a digit (or a
/// leading `+`/`(`), with at least `min_digits` digits. A single separator between digits
/// is allowed; two in a row (other than `) ` or ` (`) end the run.
pub(crate) fn number_runs(text: &str, min_digits: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    let bytes = text.as_bytes();
    let mut at = 0;
    std::iter::from_fn(move || {
        while at < bytes.len() {
            // Jump to the next digit: prose is mostly not digits.
            let start_digit = at + bytes[at..].iter().position(u8::is_ascii_digit)?;
            let mut start = start_digit;
            if start > 0 && (bytes[start - 1] == b'+' || bytes[start - 1] == b'(') {
                start -= 1;
                if start > 0 && bytes[start] == b'(' && bytes[start - 1] == b'+' {
                    start -= 1;
                }
            }
            let mut end = start_digit;
            let mut digits = 0;
            let mut i = start_digit;
            let mut separators_in_a_row = 0;
            while i < bytes.len() {
                let b = bytes[i];
                if b.is_ascii_digit() {
                    digits += 1;
                    separators_in_a_row = 0;
                    end = i + 1;
                } else if matches!(b, b' ' | b'-' | b'.' | b'(' | b')' | b'/') {
                    separators_in_a_row += 1;
                    let paren_space = i > 0 && matches!((bytes[i - 1], b), (b')', b' ') | (b' ', b'('));
                    if separators_in_a_row > 1 && !paren_space {
                        break;
                    }
                } else {
                    break;
                }
                i += 1;
            }
            at = i.max(start_digit + 1);
            // A number glued to letters (`A1234`, `1234abc`) is an identifier, not a number.
            let glued_before = start > 0 && bytes[start - 1].is_ascii_alphanumeric();
            // ... except a phone extension (`555-0100x12`), which the phone recognizer reads.
            let extension = bytes.get(end) == Some(&b'x') && bytes.get(end + 1).is_some_and(u8::is_ascii_digit);
            let glued_after = end < bytes.len() && bytes[end].is_ascii_alphabetic() && !extension;
            if digits >= min_digits && !glued_before && !glued_after {
                return Some(start..end);
            }
        }
        None
    })
}

/// The digits of `text`, as numbers.
pub(crate) fn digits_of(text: &str) -> Vec<u8> {
    text.bytes().filter(u8::is_ascii_digit).map(|b| b - b'0').collect()
}

/// Lengths of the digit groups of `text` (`415-555-0100` → `[3, 3, 4]`).
pub(crate) fn digit_groups(text: &str) -> Vec<usize> {
    text.split(|c: char| !c.is_ascii_digit())
        .filter(|group| !group.is_empty())
        .map(str::len)
        .collect()
}

#[cfg(test)]
pub(crate) fn found<'t>(recognizer: &dyn Recognizer, text: &'t str) -> Vec<&'t str> {
    let mut spans = Vec::new();
    recognizer.find(text, &mut spans);
    spans.into_iter().map(|span| &text[span]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_runs_stop_at_letters_and_double_separators() {
        let text = "call (415) 555-0100 or +44 20 7946 0958, order A12345, 2024-03-15  10:22";
        let runs: Vec<&str> = number_runs(text, 3).map(|span| &text[span]).collect();
        assert_eq!(runs, vec!["(415) 555-0100", "+44 20 7946 0958", "2024-03-15"]);
    }
}
