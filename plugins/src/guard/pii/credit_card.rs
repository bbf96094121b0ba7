//! Payment card numbers: 13 to 19 digits, written plain or in groups of 4 (Amex 4-6-5,
//! Diners 4-6-4), with a known issuer prefix, passing the Luhn check.

use super::{lower_before, DigitShape, Entity, Recognizer, Text};
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

/// Issuer identification ranges from the public IIN tables: the first digits (`low..=high`
/// over `prefix_len` digits) and the card lengths the brand issues. Every brand listed uses
/// the Luhn check, which is applied to all of them.
#[rustfmt::skip]
const ISSUERS: &[(u32, u32, usize, &[usize])] = &[
    (1, 1, 1, &[15]),                                // UATP
    (2200, 2204, 4, &[16, 17, 18, 19]),              // Mir
    (2205, 2205, 4, &[16]),                          // BORICA
    (2221, 2720, 4, &[16]),                          // Mastercard 2-series
    (31, 31, 2, &[19]),                              // China T-Union
    (34, 34, 2, &[15]),                              // American Express
    (37, 37, 2, &[15]),                              // American Express
    (300, 305, 3, &[14, 15, 16, 17, 18, 19]),        // Diners Club International
    (3095, 3095, 4, &[14, 15, 16, 17, 18, 19]),      // Diners Club International
    (36, 36, 2, &[14, 15, 16, 17, 18, 19]),          // Diners Club International
    (38, 39, 2, &[14, 15, 16, 17, 18, 19]),          // Diners Club International
    (35, 35, 2, &[16, 17, 18, 19]),                  // JCB (3528-3589), RuPay-JCB (353, 356), LankaPay (357111)
    (3841, 3841, 4, &[16, 17, 18, 19]),              // Hipercard
    (4, 4, 1, &[13, 16, 19]),                        // Visa, Visa Electron
    (5019, 5019, 4, &[16]),                          // Dankort
    (50, 50, 2, &[12, 13, 14, 15, 16, 17, 18, 19]),  // Maestro, Elo, Verve
    (51, 55, 2, &[16]),                              // Mastercard
    (56, 58, 2, &[12, 13, 14, 15, 16, 17, 18, 19]),  // Maestro
    (6, 6, 1, &[16, 17, 18, 19]),                    // Discover, UnionPay, Maestro, RuPay, Elo, Troy, Hipercard, InterPayment, InstaPayment
    (6304, 6304, 4, &[12, 13, 14, 15, 16, 17, 18, 19]), // Maestro UK
    (6759, 6759, 4, &[12, 13, 14, 15, 16, 17, 18, 19]), // Maestro UK
    (676770, 676770, 6, &[12, 13, 14, 15, 16, 17, 18, 19]), // Maestro UK
    (676774, 676774, 6, &[12, 13, 14, 15, 16, 17, 18, 19]), // Maestro UK
    (6761, 6763, 4, &[12, 13, 14, 15, 16, 17, 18, 19]), // Maestro
    (81, 82, 2, &[16]),                              // RuPay
    (8600, 8600, 4, &[16]),                          // UzCard
    (9792, 9792, 4, &[16]),                          // Troy
    (9860, 9860, 4, &[16]),                          // Humo
];

fn known_issuer(digits: &[u8]) -> bool {
    let prefix = |n: usize| digits[..n].iter().fold(0u32, |acc, &d| acc * 10 + u32::from(d));
    ISSUERS.iter().any(|&(low, high, prefix_len, lengths)| {
        digits.len() >= prefix_len && (low..=high).contains(&prefix(prefix_len)) && lengths.contains(&digits.len())
    })
}

/// How card numbers are written: plain, in fours (the last group shorter), Amex/Diners
/// 4-6-5 and 4-6-4, or 19-digit numbers as 6-13 and 4-4-4-4-3.
fn card_grouping(groups: &[u8]) -> bool {
    match groups {
        [_] | [4, 6, 5] | [4, 6, 4] | [6, 13] | [4, 4, 5] => true,
        [rest @ .., last] => rest.len() >= 2 && rest.iter().all(|g| *g == 4) && (1..=4).contains(last),
        [] => false,
    }
}

fn is_card(candidate: &str) -> bool {
    // One separator kind only: a space, a dash or a dot.
    let mut separators = candidate.bytes().filter(|b| !b.is_ascii_digit());
    if let Some(first) = separators.next() {
        if !matches!(first, b' ' | b'-' | b'.') || separators.any(|b| b != first) {
            return false;
        }
    }
    let Some(shape) = DigitShape::of(candidate) else {
        return false;
    };
    let digits = shape.digits();
    (12..=19).contains(&digits.len()) && card_grouping(shape.groups()) && known_issuer(digits) && luhn(digits)
}

/// Words that make a short plain number a card number.
#[rustfmt::skip]
const CARD_CONTEXT: &[&str] = &[
    "card", "visa", "maestro", "mastercard", "amex", "karte", "tarjeta", "carte", "cartão", "carta", "kaart", "卡",
    "カード", "карт", "pan",
];

/// Twelve or thirteen plain digits (but a 13-digit Visa) are a card number only after a
/// card word: many other numbers (EAN-13 barcodes, parcel numbers) have that length and pass
/// Luhn one time in ten.
fn short_plain_needs_context(text: &str, start: usize, candidate: &str) -> bool {
    if candidate.len() > 13 || candidate.bytes().any(|b| !b.is_ascii_digit()) {
        return false;
    }
    if candidate.len() == 13 && candidate.starts_with('4') {
        return false;
    }
    let before = lower_before(text, start, 64);
    !CARD_CONTEXT.iter().any(|word| before.contains(word))
}

impl Recognizer for CreditCard {
    fn entity(&self) -> Entity {
        Entity::CreditCard
    }

    fn find(&self, scan: &Text<'_>, found: &mut Vec<Range<usize>>) {
        let text = scan.as_str();
        scan.values_in_runs(12..=19, 5, found, |span| {
            let candidate = text[span.clone()].trim_start_matches(['+', '(']);
            let start = span.end - candidate.len();
            (is_card(candidate) && !short_plain_needs_context(text, start, candidate)).then_some(start..span.end)
        });
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
            // Lists: each value, grouped or not, by spaces, commas or lines.
            (
                "4111 1111 1111 1111 5555 5555 5555 4444",
                &["4111 1111 1111 1111", "5555 5555 5555 4444"],
            ),
            (
                "4111111111111111 5555555555554444\n378282246310005,6011111111111117",
                &[
                    "4111111111111111",
                    "5555555555554444",
                    "378282246310005",
                    "6011111111111117",
                ],
            ),
            ("user_858 (4111-1111-1111-1111)", &["4111-1111-1111-1111"]),
            // Brands of the IIN tables.
            ("uatp 135412345678911", &["135412345678911"]),
            ("dankort 5019717010103742", &["5019717010103742"]),
            ("maestro 6759649826438453", &["6759649826438453"]),
            ("mir 2200 0000 0000 0004", &["2200 0000 0000 0004"]),
            ("rupay 8112345678901239", &["8112345678901239"]),
            ("troy 9792 0000 0000 0003", &["9792 0000 0000 0003"]),
            (
                "jcb 3530111333300000, unionpay 6212345678901265",
                &["3530111333300000", "6212345678901265"],
            ),
            ("visa 4111.1111.1111.1111", &["4111.1111.1111.1111"]),
            // The 19 digits fail Luhn; their first sixteen, cut out of the run, are no card.
            ("6011 0009 9013 9424 123", &[]),
            ("usps 9400 4111 1111 1111 1111 23", &[]),
            // Twelve or thirteen plain digits need a card word (EAN-13 barcodes pass Luhn too).
            ("EAN 5845667586807", &[]),
            ("visa 4222222222222", &["4222222222222"]),
        ];
        for (text, expected) in cases {
            assert_eq!(&found(&CreditCard, text), expected, "{text}");
        }
    }
}
