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

use std::cell::OnceCell;
use std::ops::Range;

pub use credit_card::CreditCard;
pub use email::Email;
pub use iban::Iban;
pub use ip_address::IpAddress;
pub use phone::Phone;
pub use secret::Secret;
pub use us_ssn::UsSsn;

payload_processor_core::config_enum! {
    /// A kind of personal or secret data.
    pub enum Entity {
        /// E-mail addresses.
        Email = "Email" | "email",
        /// Phone numbers (E.164 and common national formats).
        Phone = "Phone" | "phone",
        /// Payment card numbers passing the Luhn check.
        CreditCard = "CreditCard" | "credit_card",
        /// US social security numbers outside the never-issued ranges.
        UsSsn = "UsSsn" | "us_ssn",
        /// International bank account numbers passing mod-97.
        Iban = "Iban" | "iban",
        /// IPv4 and IPv6 addresses.
        IpAddress = "IpAddress" | "ip_address",
        /// Credentials: cloud keys, provider API tokens, GitHub tokens, JWTs, PEM private keys.
        Secret = "Secret" | "secret",
    }
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

    /// The name used in stats, metadata and reports (the config spelling is [`Entity::spelling`]).
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

impl Entity {
    /// Which kind a value found by two recognizers is: the kind with the stricter format (an
    /// IBAN over the phone number read into its digits, an SSN over a phone number that
    /// starts inside it, `"secret": "a@b.io"` an e-mail address rather than a secret because
    /// of the word before it), and between kinds as strict the longer finding.
    fn specificity(self) -> u8 {
        match self {
            Entity::Email => 6,
            Entity::Iban => 5,
            Entity::CreditCard => 4,
            Entity::UsSsn => 3,
            Entity::IpAddress => 2,
            Entity::Secret => 1,
            Entity::Phone => 0,
        }
    }
}

/// Drops every finding that overlaps a finding of another, more specific kind.
pub fn drop_overlapped<T>(findings: &mut Vec<T>, key: impl Fn(&T) -> (Entity, Range<usize>)) {
    if findings.len() < 2 {
        return;
    }
    let keys: Vec<(Entity, Range<usize>)> = findings.iter().map(&key).collect();
    let mut index = 0;
    findings.retain(|_| {
        let (entity, span) = &keys[index];
        index += 1;
        !keys.iter().any(|(other, other_span)| {
            let overlaps = other != entity && other_span.start < span.end && span.start < other_span.end;
            let beats = (other.specificity(), other_span.len()) > (entity.specificity(), span.len());
            overlaps && beats
        })
    });
}

/// Finds one kind of value in text.
pub trait Recognizer: Send + Sync {
    /// The kind of value found.
    fn entity(&self) -> Entity;
    /// Appends the byte ranges of the values found in `text`, in order, not overlapping.
    fn find(&self, text: &Text<'_>, found: &mut Vec<Range<usize>>);
}

/// A text being scanned, with what several recognizers need computed once and shared: the
/// runs of digits (phone, card, SSN, IPv4 and IBAN candidates all start there).
pub struct Text<'t> {
    text: &'t str,
    runs: OnceCell<Vec<NumberRun>>,
}

/// A maximal run of "number-ish" text: digits with the separators phone, card and SSN
/// formats use (space, `-`, `.`, `(`, `)`, `/`, a leading `+`), starting (but for a leading
/// `+`/`(`) and ending on a digit. A single separator between digits is allowed; two in a row
/// (other than `) ` or ` (`) end the run.
#[derive(Debug, Clone)]
pub(crate) struct NumberRun {
    pub(crate) span: Range<usize>,
    pub(crate) digits: usize,
    /// A letter or digit sits right before (`A1234`, `GB82 ...`).
    pub(crate) glued_before: bool,
    /// A letter sits right after (`1234abc`), other than a phone extension (`x12`, `EXT623`).
    pub(crate) glued_after: bool,
}

impl<'t> Text<'t> {
    /// Wraps `text` for scanning.
    pub fn new(text: &'t str) -> Self {
        Self {
            text,
            runs: OnceCell::new(),
        }
    }

    /// The text.
    pub fn as_str(&self) -> &'t str {
        self.text
    }

    /// Every number run, computed on first use.
    pub(crate) fn runs(&self) -> &[NumberRun] {
        self.runs.get_or_init(|| scan_number_runs(self.text))
    }

    /// Every value `accept` takes in the number runs: each run whole first, then, when it is
    /// not one value, its stretches of consecutive digit groups, leftmost first and longest
    /// first. Lists (`4111 1111 1111 1111 5555 5555 5555 4444`, `123-45-6789 234-56-7890`)
    /// and a value after an unrelated number (`user_858 (473-15-8188)`) come out one value
    /// each. A value cut out of a longer run must stand apart from the digits left over next
    /// to it: by a different separator than its own (`ID 12 415-555-0100`) or a parenthesis;
    /// sixteen digits inside a 22-digit tracking number written in fours are not a card. A
    /// group glued to a letter never starts or ends a value. `accept` gets the span (with a
    /// leading `+`/`(` of its first group) and returns the span to report, if any.
    pub(crate) fn values_in_runs(
        &self,
        digits: std::ops::RangeInclusive<usize>,
        max_groups: usize,
        found: &mut Vec<Range<usize>>,
        mut accept: impl FnMut(Range<usize>) -> Option<Range<usize>>,
    ) {
        let bytes = self.text.as_bytes();
        let mut groups: Vec<Range<usize>> = Vec::new();
        // Digits before each group, so a stretch's digit count costs one subtraction.
        let mut digits_before: Vec<usize> = Vec::new();
        // Values of the current run: (first group, end group, span).
        let mut values: Vec<(usize, usize, Range<usize>)> = Vec::new();
        for run in self.runs() {
            if run.digits < *digits.start() {
                continue;
            }
            groups.clear();
            let mut at = run.span.start;
            while at < run.span.end {
                if bytes[at].is_ascii_digit() {
                    let start = at;
                    while at < run.span.end && bytes[at].is_ascii_digit() {
                        at += 1;
                    }
                    groups.push(start..at);
                } else {
                    at += 1;
                }
            }
            digits_before.clear();
            digits_before.push(0);
            for group in &groups {
                digits_before.push(digits_before[digits_before.len() - 1] + group.len());
            }
            let first = usize::from(run.glued_before);
            let last = groups.len() - usize::from(run.glued_after);
            values.clear();
            let mut i = first;
            while i < last {
                let start = if i == 0 {
                    run.span.start
                } else {
                    let mut start = groups[i].start;
                    if bytes[start - 1] == b'(' {
                        start -= 1;
                    }
                    start
                };
                let longest = last.min(i + max_groups);
                // Only stretches with a possible number of digits are offered (most are not).
                let taken = (i + 1..=longest).rev().find_map(|j| {
                    let count = digits_before[j] - digits_before[i];
                    if digits.contains(&count) {
                        accept(start..groups[j - 1].end).map(|span| (j, span))
                    } else {
                        None
                    }
                });
                match taken {
                    Some((j, span)) => {
                        values.push((i, j, span));
                        i = j;
                    }
                    None => i += 1,
                }
            }
            let covered = |group: usize| values.iter().any(|(a, b, _)| (*a..*b).contains(&group));
            for (a, b, span) in &values {
                let inner = groups[*a..*b]
                    .windows(2)
                    .next()
                    .map(|pair| &bytes[pair[0].end..pair[1].start]);
                let apart =
                    |between: &[u8]| between.contains(&b'(') || between.contains(&b')') || Some(between) != inner;
                let before_ok = *a == 0 || covered(a - 1) || apart(&bytes[groups[a - 1].end..groups[*a].start]);
                let after_ok = *b == groups.len() || covered(*b) || apart(&bytes[groups[b - 1].end..groups[*b].start]);
                if before_ok && after_ok {
                    found.push(span.clone());
                }
            }
        }
    }
}

/// The length of a phone extension right after `end` (`x12`, ` ext. 623`, `EXT623`, `#4`,
/// ` extension 12`), or 0.
pub(crate) fn extension_after(bytes: &[u8], end: usize) -> usize {
    let mut at = end;
    if bytes.get(at) == Some(&b' ') {
        at += 1;
    }
    // Almost every run is followed by something else: decide on one byte.
    if !matches!(bytes.get(at), Some(b'x' | b'X' | b'e' | b'E' | b'#')) {
        return 0;
    }
    let rest = &bytes[at..];
    let marker = ["extension", "ext.", "ext", "x", "#"]
        .iter()
        .find(|marker| rest.len() >= marker.len() && rest[..marker.len()].eq_ignore_ascii_case(marker.as_bytes()));
    let Some(marker) = marker else { return 0 };
    at += marker.len();
    if matches!(bytes.get(at), Some(b' ' | b'.' | b':')) {
        at += 1;
    }
    let digits_start = at;
    while at < bytes.len() && bytes[at].is_ascii_digit() && at - digits_start < 7 {
        at += 1;
    }
    let digits = at - digits_start;
    if !(1..=6).contains(&digits) || bytes.get(at).is_some_and(u8::is_ascii_alphanumeric) {
        return 0;
    }
    at - end
}

/// Position of the next ASCII digit at or after `from`: eight bytes at a time, since most
/// prose has no digits.
fn next_digit(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut at = from;
    while at + 8 <= bytes.len() {
        let word = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
        // After xor with '0' digits are the bytes below 10; this test flags every word that
        // has one (it may also flag a word without, which the bytewise look then skips).
        let shifted = word ^ (0x30 * ONES);
        let below_ten = shifted.wrapping_sub(10 * ONES) & !shifted & HIGHS;
        if below_ten != 0 {
            if let Some(offset) = bytes[at..at + 8].iter().position(u8::is_ascii_digit) {
                return Some(at + offset);
            }
        }
        at += 8;
    }
    bytes[at..]
        .iter()
        .position(u8::is_ascii_digit)
        .map(|offset| at + offset)
}

fn scan_number_runs(text: &str) -> Vec<NumberRun> {
    let bytes = text.as_bytes();
    // Prose has a run every dozen bytes or so: growing the vector showed in profiles.
    let mut runs = Vec::with_capacity(bytes.len() / 12 + 4);
    let mut at = 0;
    while let Some(start_digit) = next_digit(bytes, at) {
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
                let paren_space = matches!((bytes[i - 1], b), (b')', b' ' | b'-') | (b' ', b'('));
                if separators_in_a_row > 1 && !paren_space {
                    break;
                }
            } else {
                break;
            }
            i += 1;
        }
        at = i.max(start_digit + 1);
        // Only phone numbers (seven digits and more) carry extensions.
        let extension = digits >= 7 && extension_after(bytes, end) > 0;
        runs.push(NumberRun {
            span: start..end,
            digits,
            glued_before: start > 0 && bytes[start - 1].is_ascii_alphanumeric(),
            glued_after: end < bytes.len() && bytes[end].is_ascii_alphabetic() && !extension,
        });
    }
    runs
}

/// The digits of a candidate and the lengths of its digit groups, kept on the stack:
/// candidates are checked by the thousand, and allocating for each showed in instruction
/// counts.
pub(crate) struct DigitShape {
    digits: [u8; 24],
    len: usize,
    groups: [u8; 12],
    group_count: usize,
}

impl DigitShape {
    /// The shape of `text`, or `None` past 24 digits or 12 groups (no value here has more).
    pub(crate) fn of(text: &str) -> Option<Self> {
        let mut shape = Self {
            digits: [0; 24],
            len: 0,
            groups: [0; 12],
            group_count: 0,
        };
        let mut in_group = false;
        for b in text.bytes() {
            if b.is_ascii_digit() {
                if shape.len == shape.digits.len() {
                    return None;
                }
                shape.digits[shape.len] = b - b'0';
                shape.len += 1;
                if !in_group {
                    if shape.group_count == shape.groups.len() {
                        return None;
                    }
                    shape.group_count += 1;
                    in_group = true;
                }
                shape.groups[shape.group_count - 1] += 1;
            } else {
                in_group = false;
            }
        }
        Some(shape)
    }

    /// The digits, as numbers.
    pub(crate) fn digits(&self) -> &[u8] {
        &self.digits[..self.len]
    }

    /// The lengths of the digit groups (`415-555-0100` → `[3, 3, 4]`).
    pub(crate) fn groups(&self) -> &[u8] {
        &self.groups[..self.group_count]
    }
}

/// Up to `window` bytes of `text` before `start`, lower-cased: where recognizers look for
/// context words (`phone`, `SSN`, `card`, `version`).
pub(crate) fn lower_before(text: &str, start: usize, window: usize) -> String {
    let mut from = start.saturating_sub(window);
    while !text.is_char_boundary(from) {
        from -= 1;
    }
    text[from..start].to_lowercase()
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
    recognizer.find(&Text::new(text), &mut spans);
    spans.into_iter().map(|span| &text[span]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_runs_stop_at_letters_and_double_separators() {
        let text = "call (415) 555-0100 or +44 20 7946 0958, order A12345, 2024-03-15  10:22";
        let scan = Text::new(text);
        let runs: Vec<&str> = scan
            .runs()
            .iter()
            .filter(|run| run.digits >= 3 && !run.glued_before && !run.glued_after)
            .map(|run| &text[run.span.clone()])
            .collect();
        assert_eq!(runs, vec!["(415) 555-0100", "+44 20 7946 0958", "2024-03-15"]);
    }
}

#[cfg(test)]
mod digit_search_tests {
    use super::next_digit;

    #[test]
    fn finds_the_first_digit_at_every_position() {
        for len in 0..40 {
            for digit_at in 0..=len {
                let mut text = vec![b'a'; len];
                // Bytes next to '0'..'9' in the table must not count.
                for (i, b) in text.iter_mut().enumerate() {
                    if i % 3 == 0 {
                        *b = if i % 2 == 0 { b'/' } else { b':' };
                    }
                }
                let expected = (digit_at < len).then(|| {
                    text[digit_at] = b'7';
                    digit_at
                });
                assert_eq!(next_digit(&text, 0), expected, "len {len} digit at {digit_at}");
            }
        }
    }
}
