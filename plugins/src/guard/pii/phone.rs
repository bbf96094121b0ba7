//! Phone numbers, from the ITU-T E.164 numbering plan and the national layouts of the most
//! populous countries' numbering plans:
//! - international: `+` or `00`, a valid country calling code, 8 to 15 digits in all, any
//!   grouping (`+44 (0)20 7946 0958`, `+86 138 0013 8000`, `0049 30 1234567`);
//! - national with a trunk prefix: `0` then 8 to 12 digits in groups of two or more
//!   (`020 7946 0958`, `03-1234-5678`, `0812-3456-7890`, `0300-1234567`, `030/12345678`,
//!   `01 23 45 67 89`), or Russia's `8 (495) 123-45-67`;
//! - national without one: North America `(415) 555-0100`, `415.555.0100`, `1-800-555-0100`,
//!   `425 8829090`; China `138 0013 8000`; India `98451 23760`; Brazil `(11) 91234-5678`;
//!   Mexico `55 1234 5678`; Spain `612 34 56 78`; Poland `512 345 678`, `22 123 45 67`;
//! - a bare run of digits by its length and first digits (ten digits of a North American or
//!   Indian number, eleven of a Chinese mobile or `1` + North America, a trunk `0` then nine
//!   or ten), or of nine to thirteen digits after a phone word;
//!
//! with an extension taken along (`x12`, `ext. 623`, `EXT623`, `#4`). Numbers after an
//! order/invoice/account-style word, dates, versions, IPv4 addresses, thousands groupings and
//! sequential or repeated digit runs (`1234567890`, `555-555-5555`) are not phones.

use super::{digit_groups, extension_after, lower_before, DigitShape, Entity, Recognizer, Text};
use std::ops::Range;

/// Recognizes phone numbers.
#[derive(Debug, Default)]
pub struct Phone;

/// Words that make a bare number an identifier rather than a phone number.
#[rustfmt::skip]
const NOT_A_PHONE_BEFORE: &[&str] = &[
    "order", "invoice", "account", "acct", "tracking", "ticket", "ref", "id", "no.", "serial", "sku", "case", "#",
    "timestamp", "epoch", "isbn", "ean", "upc", "build", "version", "po", "pid", "uid", "nr", "number:",
];

/// Words that make a bare number a phone number.
#[rustfmt::skip]
const PHONE_CONTEXT: &[&str] = &[
    "phone", "tel", "mobile", "cell", "call", "fax", "whatsapp", "sms", "text me", "reach me", "contact",
    "telefon", "téléphone", "teléfono", "telefone", "numero", "número", "handy", "portable", "móvil", "celular",
    "电话", "電話", "手机", "携帯", "телефон", "тел.", "전화", "điện thoại", "telepon", "फ़ोन", "फोन",
];

/// Two-digit E.164 country calling codes.
#[rustfmt::skip]
const COUNTRY_CODES_2: &[u8] = &[
    20, 27, 30, 31, 32, 33, 34, 36, 39, 40, 41, 43, 44, 45, 46, 47, 48, 49, 51, 52, 53, 54, 55, 56, 57, 58,
    60, 61, 62, 63, 64, 65, 66, 81, 82, 84, 86, 90, 91, 92, 93, 94, 95, 98,
];

/// First two digits of the three-digit E.164 country calling codes.
#[rustfmt::skip]
const COUNTRY_CODES_3: &[u8] = &[
    21, 22, 23, 24, 25, 26, 29, 35, 37, 38, 42, 50, 59, 67, 68, 69, 80, 85, 87, 88, 96, 97, 99,
];

/// National significant number lengths (digits after the country code, trunk prefix left
/// out) of the most populous countries' numbering plans.
#[rustfmt::skip]
const NSN_LENGTHS: &[(u16, u8, u8)] = &[
    (1, 10, 10), (7, 10, 10), (20, 9, 10), (27, 9, 9), (33, 9, 9), (34, 9, 9), (39, 6, 11), (44, 9, 10),
    (48, 9, 9), (49, 6, 13), (52, 10, 10), (54, 10, 11), (55, 10, 11), (57, 8, 10), (62, 8, 12), (63, 8, 10),
    (66, 8, 9), (81, 9, 10), (82, 8, 10), (84, 9, 10), (86, 9, 11), (90, 10, 10), (91, 10, 10), (92, 9, 10),
    (93, 9, 9), (95, 7, 10), (98, 10, 10), (213, 8, 9), (234, 8, 10), (243, 9, 9), (249, 9, 9), (251, 9, 9),
    (254, 9, 9), (255, 9, 9), (256, 9, 9), (880, 10, 10), (964, 10, 10),
];

/// The country calling code at the start of `digits` and its length, if one is assigned.
fn country_code(digits: &[u8]) -> Option<(u16, usize)> {
    match digits {
        [d @ (1 | 7), ..] => Some((u16::from(*d), 1)),
        [a, b, rest @ ..] => {
            let two = a * 10 + b;
            if COUNTRY_CODES_2.contains(&two) {
                Some((u16::from(two), 2))
            } else if COUNTRY_CODES_3.contains(&two) && !rest.is_empty() {
                Some((u16::from(two) * 10 + u16::from(rest[0]), 3))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// An international number: `digits` start with the country code; `trunk_written` tells
/// whether a `(0)` trunk digit is among them, right after the code.
fn international(digits: &[u8], trunk_written: bool) -> bool {
    let Some((code, code_len)) = country_code(digits) else {
        return false;
    };
    let national = digits.len() - code_len - usize::from(trunk_written);
    let (min, max) = NSN_LENGTHS
        .iter()
        .find(|(c, _, _)| *c == code)
        .map_or((4, 15 - code_len), |(_, min, max)| {
            (usize::from(*min), usize::from(*max))
        });
    (8..=15).contains(&(digits.len() - usize::from(trunk_written))) && (min..=max).contains(&national)
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

/// `1234567890`, `9876543210`, `5555555555`: test and filler numbers, not anyone's phone.
fn sequential_or_repeated(digits: &[u8]) -> bool {
    let step = |by: u8| digits.windows(2).all(|w| w[1] == (w[0] + by) % 10);
    step(0)
        || step(1)
        || step(9)
        || digits[digits.len().saturating_sub(7)..]
            .iter()
            .all(|d| *d == digits[digits.len() - 1])
            && digits.len() >= 10
}

/// A national layout without a trunk prefix.
fn national_layout(groups: &[u8], digits: &[u8]) -> bool {
    let first = digits[0];
    match groups {
        [3, 3, 4] | [3, 7] => first >= 2 || (first == 1 && digits[1] >= 3), // North America; Italy, Colombia, China
        [1, 3, 3, 4] => first == 1 && digits[1] >= 2,                       // 1-800-555-0100
        [3, 4, 4] => first == 1 && digits[1] >= 3,                          // China mobile
        [5, 5] => first >= 6,                                               // India mobile
        [2, 4, 4] | [2, 5, 4] => first >= 1,                                // Mexico, Brazil
        [3, 3, 3] | [3, 2, 2, 2] => first >= 5,                             // Spain, Poland mobile
        [2, 3, 2, 2] | [3, 3, 2, 2] => first >= 1,                          // Poland, Russia
        _ => false,
    }
}

/// A national number with a trunk prefix `0` (or Russia's `8`).
fn trunk_layout(groups: &[u8], digits: &[u8]) -> bool {
    let total = digits.len();
    if digits[0] == 8 {
        return matches!(groups, [1, 3, 3, 2, 2] | [1, 3, 3, 4] | [1, 3, 7]) && total == 11;
    }
    if digits[0] != 0 || digits[1] == 0 || groups.len() < 2 {
        return false;
    }
    let max_total = if groups.len() >= 5 { 11 } else { 13 };
    (9..=max_total).contains(&total)
        && groups.len() <= 6
        && groups.iter().all(|g| (2..=8).contains(g))
        && groups.iter().skip(1).any(|g| *g >= 3)
        || (groups.len() >= 5 && total == 10 && groups.iter().all(|g| *g == 2)) // 01 23 45 67 89
}

/// One run of digits with nothing between them.
fn bare_number(text: &str, start: usize, digits: &[u8]) -> bool {
    if !(9..=13).contains(&digits.len()) {
        return false;
    }
    let by_length = match (digits.len(), digits[0], digits[1]) {
        (10, 6..=9, _) => true,           // North America, India
        (10, 2..=5, _) => digits[3] >= 2, // North America: NXX-NXX-XXXX
        (11, 1, 2..=9) => true,           // China mobile, 1 + North America
        (10 | 11, 0, 1..=9) => true,      // a trunk 0
        _ => false,
    };
    let before = lower_before(text, start, 24);
    (by_length && !looks_like_identifier(&before)) || has_phone_context(&before)
}

/// Currency codes, symbols and units: a number next to one is an amount (`123 456 789 EUR`).
#[rustfmt::skip]
const AMOUNT_WORDS: &[&str] = &[
    "eur", "euro", "€", "usd", "$", "dollar", "gbp", "£", "pln", "zł", "rub", "₽", "руб", "chf", "jpy", "¥", "yuan",
    "rmb", "inr", "₹", "brl", "r$", "units", "items", "pcs", "km", "kg", "tons", "people", "users",
];

fn amount(text: &str, span: &Range<usize>) -> bool {
    let after = text[span.end..].trim_start_matches(' ');
    let after: String = after.chars().take(8).collect::<String>().to_lowercase();
    let before = text[..span.start].trim_end_matches(' ');
    AMOUNT_WORDS
        .iter()
        .any(|word| after.starts_with(word) && !after[word.len()..].starts_with(|c: char| c.is_alphanumeric()))
        || before.ends_with(['$', '€', '£', '¥', '₹', '₽'])
}

/// A long number written in fours (`9400 1000 0000 0000 0000 00`: a parcel or account
/// number) holds no phone number.
fn written_in_fours(text: &str, span: &Range<usize>) -> bool {
    let bytes = text.as_bytes();
    let mut start = span.start;
    while start > 0 && (bytes[start - 1].is_ascii_digit() || bytes[start - 1] == b' ') {
        start -= 1;
    }
    let mut end = span.end;
    while end < bytes.len() && (bytes[end].is_ascii_digit() || bytes[end] == b' ') {
        end += 1;
    }
    let groups = digit_groups(&text[start..end]);
    groups.len() >= 5 && groups[..groups.len() - 1].iter().all(|g| *g == 4)
}

/// A phone number by its own digits and layout, then by what surrounds it.
fn is_phone(text: &str, span: &Range<usize>) -> bool {
    let digit_count = text.as_bytes()[span.clone()]
        .iter()
        .filter(|b| b.is_ascii_digit())
        .count();
    // Plain digits need nine or more (most numbers in prose are shorter); said first, as cheap.
    let plain = digit_count == span.len();
    digit_count >= if plain { 9 } else { 8 }
        && phone_layout(text, span)
        && !amount(text, span)
        && !written_in_fours(text, span)
}

fn phone_layout(text: &str, span: &Range<usize>) -> bool {
    let candidate = &text[span.clone()];
    let (mut dots, mut spaces_or_dashes, mut slashes) = (0, 0, 0);
    for b in candidate.bytes() {
        match b {
            b'.' => dots += 1,
            b' ' | b'-' => spaces_or_dashes += 1,
            b'/' => slashes += 1,
            _ => {}
        }
    }
    let unwrapped = candidate.trim_start_matches('(');
    let is_international = candidate.starts_with('+') || unwrapped.starts_with("00");
    // Dates, times and coordinates mix dots with other separators (an international number
    // may put a space after its country code: `+33 6.12.34.56.78`).
    let first_separator_kept = usize::from(is_international);
    if dots > 0 && (spaces_or_dashes + slashes > first_separator_kept) {
        return false;
    }
    let Some(shape) = DigitShape::of(candidate) else {
        return false;
    };
    let (groups, digits) = (shape.groups(), shape.digits());
    if digits.len() < 8 || sequential_or_repeated(digits) {
        return false;
    }
    if dots > 0 {
        // An IPv4 address or a thousands grouping (`1.234.567.890`).
        let thousands = groups[1..].iter().all(|g| *g == 3) && groups[0] <= 3;
        if (groups.len() == 4 && groups.iter().all(|g| *g <= 3)) || thousands {
            return false;
        }
    }
    if is_international && (candidate.starts_with('+') || groups.len() > 1) {
        let significant = if candidate.starts_with('+') {
            digits
        } else {
            &digits[2..]
        };
        return groups.len() <= 8 && slashes <= 1 && international(significant, candidate.contains("(0)"));
    }
    if slashes > 0 {
        // German and Austrian `030/12345678`.
        return slashes == 1 && groups.len() == 2 && digits[0] == 0 && (9..=12).contains(&digits.len());
    }
    if groups.len() == 1 {
        return bare_number(text, span.start, digits);
    }
    national_layout(groups, digits) || trunk_layout(groups, digits)
}

impl Recognizer for Phone {
    fn entity(&self) -> Entity {
        Entity::Phone
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        let bytes = text.as_bytes();
        scan.values_in_runs(8..=17, 8, found, |span| {
            is_phone(text, &span).then(|| span.start..span.end + extension_after(bytes, span.end))
        });
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
            // Groupings, separators and extensions.
            ("call 425 8829090 now", &["425 8829090"]),
            ("+1 (425) 882-9090 EXT623", &["+1 (425) 882-9090 EXT623"]),
            (
                "425-882-9090 ext. 12 or 425.882.9091 #4",
                &["425-882-9090 ext. 12", "425.882.9091 #4"],
            ),
            ("Büro 030/12345678", &["030/12345678"]),
            // National layouts (ITU numbering plans).
            ("北京 138 0013 8000", &["138 0013 8000"]),
            ("मोबाइल 98451 23760", &["98451 23760"]),
            ("ligue (11) 91234-5678", &["(11) 91234-5678"]),
            ("電話 03-1234-5678 / 090-1234-5678", &["03-1234-5678", "090-1234-5678"]),
            ("hubungi 0812-3456-7890", &["0812-3456-7890"]),
            ("звоните 8 (495) 123-45-67", &["8 (495) 123-45-67"]),
            ("llame al 612 34 56 78", &["612 34 56 78"]),
            ("zadzwoń 512 345 678", &["512 345 678"]),
            ("010-1234-5678 (Seoul)", &["010-1234-5678"]),
            ("0300-1234567 and 01712-345678", &["0300-1234567", "01712-345678"]),
            (
                "+86 138 0013 8000 and 0049 30 1234567",
                &["+86 138 0013 8000", "0049 30 1234567"],
            ),
            // Lists.
            (
                "415-555-0100 415-555-0101\n020 7946 0958 020 7946 0959",
                &["415-555-0100", "415-555-0101", "020 7946 0958", "020 7946 0959"],
            ),
            // Not phones.
            ("1234567890 and 9876543210 and 555-555-5555", &[]),
            ("ISBN 978-0-306-40615-7 and 0-306-40615-2", &[]),
            ("timestamp 1700000000 and 192.168.100.200", &[]),
            ("1.234.567.890 EUR", &[]),
            ("+28 1234 5678", &[]),
            ("Revenue: 612 345 678 EUR or $ 415-555-0100", &[]),
            ("USPS 0954 4886 9490 0417 5534 89", &[]),
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
