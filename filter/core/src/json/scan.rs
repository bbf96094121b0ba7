//! A structural pass over a JSON object that finds its top-level members without building
//! anything, fast enough to run on every request body.
//!
//! Request bodies of LLM APIs are mostly long strings (prompts), so the pass jumps through
//! strings with `memchr` (SIMD, chosen at run time) to the closing quote instead of looking at
//! every byte as a general parser does. Outside strings it checks the grammar: brackets,
//! separators, numbers, literals, the UTF-8 and escapes of top-level keys, and nothing after
//! the object. It does not check what a skipped string holds (its UTF-8, raw control
//! characters, escape letters), so it may accept a body serde_json would refuse there; it
//! always finds the same structure and the same members as serde_json, and the value it
//! returns is checked in full. The model server still refuses what is malformed.
//!
//! It answers only when it is sure. Anything it does not accept is `Err(Unsure)`, and the
//! caller asks serde_json, which is the authority on what is valid and words the error.

use memchr::memchr;
use std::borrow::Cow;
use std::cell::Cell;
use std::ops::Range;

/// The bytes the pass reads: one slice, or the slices a proxy keeps a body in ([`Segments`]).
pub(crate) trait Source {
    /// Byte at `pos`, if inside.
    fn at(&self, pos: usize) -> Option<u8>;
    /// Position of the first `byte` at or after `from`.
    fn find(&self, byte: u8, from: usize) -> Option<usize>;
    /// Number of bytes.
    fn size(&self) -> usize;
    /// The bytes of `range`: borrowed when they lie in one slice, copied when they span two.
    fn bytes(&self, range: Range<usize>) -> Cow<'_, [u8]>;
    /// The eight bytes from `pos` as a little-endian word, when they lie in one slice.
    fn word(&self, pos: usize) -> Option<u64>;
}

impl Source for [u8] {
    #[inline]
    fn at(&self, pos: usize) -> Option<u8> {
        self.get(pos).copied()
    }
    #[inline]
    fn find(&self, byte: u8, from: usize) -> Option<usize> {
        Some(from + memchr(byte, self.get(from..)?)?)
    }
    #[inline]
    fn size(&self) -> usize {
        self.len()
    }
    #[inline]
    fn bytes(&self, range: Range<usize>) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self[range])
    }
    #[inline(always)]
    fn word(&self, pos: usize) -> Option<u64> {
        let bytes = self.get(pos..pos.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }
}

/// A body as a sequence of slices, read in place. The pass moves forward, so the slice of the
/// last position read is remembered and most lookups cost one comparison.
pub(crate) struct Segments<'a> {
    parts: Vec<&'a [u8]>,
    /// Offset of each part in the whole body.
    starts: Vec<usize>,
    len: usize,
    /// The part read last, and its offset in the body.
    part: Cell<&'a [u8]>,
    part_start: Cell<usize>,
    part_index: Cell<usize>,
}

impl<'a> Segments<'a> {
    pub(crate) fn new(slices: &[&'a [u8]]) -> Self {
        let parts: Vec<&[u8]> = slices.iter().copied().filter(|part| !part.is_empty()).collect();
        let mut starts = Vec::with_capacity(parts.len());
        let mut len = 0;
        for part in &parts {
            starts.push(len);
            len += part.len();
        }
        Self {
            part: Cell::new(parts.first().copied().unwrap_or_default()),
            part_start: Cell::new(0),
            part_index: Cell::new(0),
            parts,
            starts,
            len,
        }
    }

    /// The part holding `pos` (made the current one) and the offset in it.
    #[cold]
    #[inline(never)]
    fn locate(&self, pos: usize) -> Option<(usize, usize)> {
        if pos >= self.len {
            return None;
        }
        let index = self.starts.partition_point(|&start| start <= pos) - 1;
        self.enter(index);
        Some((index, pos - self.starts[index]))
    }

    fn enter(&self, index: usize) {
        self.part.set(self.parts[index]);
        self.part_start.set(self.starts[index]);
        self.part_index.set(index);
    }
}

impl Source for Segments<'_> {
    #[inline(always)]
    fn at(&self, pos: usize) -> Option<u8> {
        if let Some(byte) = self.part.get().get(pos.wrapping_sub(self.part_start.get())) {
            return Some(*byte);
        }
        let (index, offset) = self.locate(pos)?;
        Some(self.parts[index][offset])
    }

    fn find(&self, byte: u8, from: usize) -> Option<usize> {
        let offset = from.wrapping_sub(self.part_start.get());
        let (mut index, mut offset) = if offset < self.part.get().len() {
            (self.part_index.get(), offset)
        } else {
            self.locate(from)?
        };
        loop {
            if let Some(found) = memchr(byte, &self.parts[index][offset..]) {
                self.enter(index);
                return Some(self.starts[index] + offset + found);
            }
            index += 1;
            offset = 0;
            if index == self.parts.len() {
                return None;
            }
        }
    }

    fn size(&self) -> usize {
        self.len
    }

    #[inline(always)]
    fn word(&self, pos: usize) -> Option<u64> {
        let offset = pos.wrapping_sub(self.part_start.get());
        let bytes = self.part.get().get(offset..offset.checked_add(8)?)?;
        Some(u64::from_le_bytes(bytes.try_into().ok()?))
    }

    fn bytes(&self, range: Range<usize>) -> Cow<'_, [u8]> {
        if range.is_empty() {
            return Cow::Borrowed(&[]);
        }
        let (first, offset) = self.locate(range.start).expect("a range inside the body");
        if offset + range.len() <= self.parts[first].len() {
            return Cow::Borrowed(&self.parts[first][offset..offset + range.len()]);
        }
        let mut copy = Vec::with_capacity(range.len());
        let (mut index, mut offset) = (first, offset);
        while copy.len() < range.len() {
            let take = (range.len() - copy.len()).min(self.parts[index].len() - offset);
            copy.extend_from_slice(&self.parts[index][offset..offset + take]);
            index += 1;
            offset = 0;
        }
        Cow::Owned(copy)
    }
}

/// The pass could not vouch for the document; serde_json decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Unsure;

/// What the pass found for one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Found {
    /// The key is not a member of the (well-formed) object.
    Absent,
    /// The key's value, at this span.
    Once(Range<usize>),
    /// The key occurs more than once.
    Twice,
}

/// Scans the whole top-level object in `json` (and so checks its structure) for `key`.
pub(crate) fn find_key<S: Source + ?Sized>(json: &S, key: &str) -> Result<Found, Unsure> {
    let [found] = find_keys(json, [key])?;
    Ok(found)
}

/// [`find_key`] for several keys in the same pass.
pub(crate) fn find_keys<S: Source + ?Sized, const N: usize>(json: &S, keys: [&str; N]) -> Result<[Found; N], Unsure> {
    let mut pos = skip_ws(json, 0);
    expect(json, pos, b'{')?;
    pos = skip_ws(json, pos + 1);
    let mut found: [Option<Range<usize>>; N] = std::array::from_fn(|_| None);
    let mut twice = [false; N];
    // The closing brackets of open containers, reused by every value skipped.
    let mut open: Vec<u8> = Vec::new();
    if json.at(pos) == Some(b'}') {
        pos += 1;
    } else {
        loop {
            let (name_end, value_start) = member_name(json, pos)?;
            let mut is_key = [false; N];
            for (index, key) in keys.iter().enumerate() {
                is_key[index] = key_equals(json, pos..name_end, key)?;
            }
            pos = skip_value(json, value_start, &mut open)?;
            for index in 0..N {
                if is_key[index] {
                    twice[index] |= found[index].is_some();
                    found[index] = Some(value_start..pos);
                }
            }
            pos = skip_ws(json, pos);
            match json.at(pos) {
                Some(b',') => pos = skip_ws(json, pos + 1),
                Some(b'}') => {
                    pos += 1;
                    break;
                }
                _ => return Err(Unsure),
            }
        }
    }
    if skip_ws(json, pos) != json.size() {
        return Err(Unsure);
    }
    Ok(std::array::from_fn(|index| match found[index].take() {
        _ if twice[index] => Found::Twice,
        Some(span) => Found::Once(span),
        None => Found::Absent,
    }))
}

#[inline]
fn expect<S: Source + ?Sized>(json: &S, pos: usize, byte: u8) -> Result<(), Unsure> {
    if json.at(pos) == Some(byte) {
        Ok(())
    } else {
        Err(Unsure)
    }
}

#[inline]
fn skip_ws<S: Source + ?Sized>(json: &S, mut pos: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = json.at(pos) {
        pos += 1;
    }
    pos
}

/// Does the quoted key at `quoted` (quotes included) equal `key`? Keys must be valid UTF-8, as
/// serde_json requires when it reads them; escaped keys are decoded by serde_json.
fn key_equals<S: Source + ?Sized>(json: &S, quoted: Range<usize>, key: &str) -> Result<bool, Unsure> {
    // The usual case, a key spelled without escapes, compared in place.
    let plain_key = !key.bytes().any(|b| b == b'\\' || b == b'"');
    if plain_key && quoted.len() - 2 == key.len() {
        let same = key
            .bytes()
            .enumerate()
            .all(|(i, byte)| json.at(quoted.start + 1 + i) == Some(byte));
        if same {
            return Ok(true);
        }
    }
    let quoted = json.bytes(quoted);
    let inner = &quoted[1..quoted.len() - 1];
    if memchr(b'\\', inner).is_none() {
        if !inner.is_ascii() {
            std::str::from_utf8(inner).map_err(|_| Unsure)?;
        }
        // Without escapes the key is its bytes, compared above.
        return Ok(false);
    }
    let decoded: String = serde_json::from_slice(&quoted).map_err(|_| Unsure)?;
    Ok(decoded == key)
}

/// From just after an opening quote to just after the closing one. A quote closes the string
/// unless an odd run of backslashes precedes it (`\\` is an escaped backslash, `\"` an
/// escaped quote), so one search for quotes finds the end. The first 16 bytes are looked at
/// eight at a time (most keys and short values end there: cheaper than setting up a vector
/// search), the rest with `memchr`.
#[inline(always)]
fn skip_string<S: Source + ?Sized>(json: &S, mut pos: usize) -> Result<usize, Unsure> {
    let start = pos;
    for _ in 0..2 {
        let Some(word) = json.word(pos) else { break };
        let special = byte_positions(word, b'"') | byte_positions(word, b'\\');
        if special != 0 {
            let at = pos + (special.trailing_zeros() / 8) as usize;
            if json.at(at) == Some(b'"') {
                return Ok(at + 1);
            }
            pos = at;
            break;
        }
        pos += 8;
    }
    loop {
        let at = json.find(b'"', pos).ok_or(Unsure)?;
        let mut backslashes = 0;
        while at - backslashes > start && json.at(at - backslashes - 1) == Some(b'\\') {
            backslashes += 1;
        }
        if backslashes % 2 == 0 {
            return Ok(at + 1);
        }
        pos = at + 1;
    }
}

/// High bit set in each byte of `word` equal to `byte`, exact up to the first such byte (the
/// lowest set bit is always right; bits above it may be spurious, and are never used).
#[inline(always)]
fn byte_positions(word: u64, byte: u8) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let x = word ^ (ONES * u64::from(byte));
    x.wrapping_sub(ONES) & !x & (ONES << 7)
}

/// Skips one value starting at `pos` (no leading whitespace). Iterative: nesting depth costs a
/// byte of heap per level (in `open`, left empty), never stack.
fn skip_value<S: Source + ?Sized>(json: &S, mut pos: usize, open: &mut Vec<u8>) -> Result<usize, Unsure> {
    open.clear();
    loop {
        // A value.
        match json.at(pos) {
            Some(b'"') => pos = skip_string(json, pos + 1)?,
            Some(opener @ (b'{' | b'[')) => {
                let closer = if opener == b'{' { b'}' } else { b']' };
                pos = skip_ws(json, pos + 1);
                if json.at(pos) == Some(closer) {
                    pos += 1;
                } else {
                    open.push(closer);
                    if closer == b'}' {
                        pos = member_name(json, pos)?.1;
                    }
                    continue;
                }
            }
            Some(b't') => pos = skip_literal(json, pos, b"true")?,
            Some(b'f') => pos = skip_literal(json, pos, b"false")?,
            Some(b'n') => pos = skip_literal(json, pos, b"null")?,
            Some(b'-' | b'0'..=b'9') => pos = skip_number(json, pos)?,
            _ => return Err(Unsure),
        }
        // After a value: close what ends here, or move to the next element or member.
        loop {
            let Some(&closer) = open.last() else {
                return Ok(pos);
            };
            pos = skip_ws(json, pos);
            match json.at(pos) {
                Some(b',') => {
                    pos = skip_ws(json, pos + 1);
                    if closer == b'}' {
                        pos = member_name(json, pos)?.1;
                    }
                    break;
                }
                Some(byte) if byte == closer => {
                    open.pop();
                    pos += 1;
                }
                _ => return Err(Unsure),
            }
        }
    }
}

/// `"name" :` and the whitespace before the value: where the quoted name ends and the value
/// starts.
#[inline]
fn member_name<S: Source + ?Sized>(json: &S, pos: usize) -> Result<(usize, usize), Unsure> {
    expect(json, pos, b'"')?;
    let name_end = skip_string(json, pos + 1)?;
    let colon = skip_ws(json, name_end);
    expect(json, colon, b':')?;
    Ok((name_end, skip_ws(json, colon + 1)))
}

fn skip_literal<S: Source + ?Sized>(json: &S, pos: usize, literal: &[u8]) -> Result<usize, Unsure> {
    if literal
        .iter()
        .enumerate()
        .all(|(i, byte)| json.at(pos + i) == Some(*byte))
    {
        Ok(pos + literal.len())
    } else {
        Err(Unsure)
    }
}

/// A number as JSON spells it: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn skip_number<S: Source + ?Sized>(json: &S, mut pos: usize) -> Result<usize, Unsure> {
    let digits = |mut pos: usize| {
        let start = pos;
        while json.at(pos).is_some_and(|b| b.is_ascii_digit()) {
            pos += 1;
        }
        (pos, pos > start)
    };
    if json.at(pos) == Some(b'-') {
        pos += 1;
    }
    match json.at(pos) {
        Some(b'0') => pos += 1,
        Some(b'1'..=b'9') => pos = digits(pos).0,
        _ => return Err(Unsure),
    }
    if json.at(pos) == Some(b'.') {
        let (end, any) = digits(pos + 1);
        if !any {
            return Err(Unsure);
        }
        pos = end;
    }
    if let Some(b'e' | b'E') = json.at(pos) {
        pos += 1;
        if let Some(b'+' | b'-') = json.at(pos) {
            pos += 1;
        }
        let (end, any) = digits(pos);
        if !any {
            return Err(Unsure);
        }
        pos = end;
    }
    Ok(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find(json: &str) -> Result<Found, Unsure> {
        find_key(json.as_bytes(), "model")
    }

    fn span_text(json: &str) -> Option<&str> {
        match find(json) {
            Ok(Found::Once(span)) => Some(&json[span]),
            _ => None,
        }
    }

    #[test]
    fn finds_the_member_wherever_it_is() {
        assert_eq!(span_text(r#"{"model":"m"}"#), Some(r#""m""#));
        assert_eq!(
            span_text(r#" { "messages" : [ {"role":"user","content":"say \"model\": \\"} ] , "model" : "m" } "#),
            Some(r#""m""#)
        );
        assert_eq!(
            span_text(r#"{"a":{"model":1},"model":[1,{"b":null}]}"#),
            Some(r#"[1,{"b":null}]"#)
        );
        assert_eq!(span_text(r#"{"mod\u0065l":-1.5e+3}"#), Some("-1.5e+3"));
        assert_eq!(find(r#"{"a":1}"#), Ok(Found::Absent));
        assert_eq!(find("{}"), Ok(Found::Absent));
        assert_eq!(find(r#"{"model":1,"mod\u0065l":2}"#), Ok(Found::Twice));
    }

    #[test]
    fn refuses_what_it_cannot_vouch_for() {
        for bad in [
            "",
            "[]",
            "\u{feff}{}",
            r#"{"model":"m""#,
            r#"{"model":"m",}"#,
            r#"{"model":"m"} x"#,
            r#"{"model" "m"}"#,
            r#"{model:"m"}"#,
            r#"{"a":[1,2}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":{"b"}}"#,
            r#"{"a":tru}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":1e}"#,
            r#"{"a":"unterminated}"#,
            r#"{"a":NaN}"#,
        ] {
            assert_eq!(find(bad), Err(Unsure), "{bad:?}");
        }
        assert_eq!(find_key(&b"{\"\xff\":1}"[..], "model"), Err(Unsure));
    }

    #[test]
    fn a_quote_closes_a_string_unless_an_odd_run_of_backslashes_precedes_it() {
        assert_eq!(span_text(r#"{"a":"ends in \\","model":"m"}"#), Some(r#""m""#));
        assert_eq!(span_text(r#"{"a":"\"model\":\\\"x","model":"m"}"#), Some(r#""m""#));
        assert_eq!(span_text(r#"{"a":"\\\\\\","model":"m"}"#), Some(r#""m""#));
        assert_eq!(find(r#"{"a":"\\\"}"#), Err(Unsure));
        // What a skipped string holds is not checked (serde_json would refuse `\q`).
        assert_eq!(span_text(r#"{"a":"\q","model":"m"}"#), Some(r#""m""#));
        // Keys are: an escaped key must decode.
        assert_eq!(find(r#"{"mo\qdel":1}"#), Err(Unsure));
    }

    #[test]
    fn deep_nesting_is_skipped_without_recursion() {
        let deep = format!("{{\"a\":{}{},\"model\":1}}", "[".repeat(200_000), "]".repeat(200_000));
        assert_eq!(span_text(&deep), Some("1"));
        let unbalanced = format!("{{\"a\":{}}}", "[".repeat(1000));
        assert_eq!(find(&unbalanced), Err(Unsure));
    }

    #[test]
    fn agrees_with_serde_json_on_valid_documents() {
        let docs = [
            r#"{"messages":[{"role":"system","content":"be \"brief\"\n"},{"role":"user","content":"h\u00e9llo \ud83d\ude00"}],"max_tokens":256,"temperature":0.7,"stream":false,"stop":null,"model":"llama"}"#,
            r#"{"model":{"name":"x","tags":[]},"n":-0,"e":1E-2}"#,
            "{\"model\"\t:\r\n\"a\\/b\"}",
        ];
        for doc in docs {
            let value: serde_json::Value = serde_json::from_str(doc).unwrap();
            let span = span_text(doc).unwrap();
            assert_eq!(serde_json::from_str::<serde_json::Value>(span).unwrap(), value["model"]);
        }
    }

    /// The same document in every two-slice split and in one-byte slices: the same answer,
    /// and the same value bytes, as in one buffer.
    #[test]
    fn slices_give_the_answers_of_one_buffer() {
        let docs = [
            r#"{"messages":[{"role":"user","content":"say \"model\": \\"}],"model":"m"}"#,
            r#"{"model":"first","messages":[{"role":"system","content":"a long enough text to need a search"}]}"#,
            r#"{"a":"ends in \\","mod\u0065l":[1,{"b":null}],"n":-1.5e+3,"t":true,"f":false}"#,
            r#"{"model":1,"mod\u0065l":2}"#,
            r#"{"a":[1,2}"#,
            r#"{"model":"m"} x"#,
            "{}",
            " { \"model\" : \"spaced\" } ",
        ];
        for doc in docs {
            let whole = find_key(doc.as_bytes(), "model");
            let value = |found: &Result<Found, Unsure>, source: &dyn Fn(Range<usize>) -> Vec<u8>| match found {
                Ok(Found::Once(span)) => Some(source(span.clone())),
                _ => None,
            };
            let expected = value(&whole, &|span| doc.as_bytes()[span].to_vec());
            let bytes = doc.as_bytes();
            let mut splits: Vec<Vec<&[u8]>> = (0..=bytes.len()).map(|at| vec![&bytes[..at], &bytes[at..]]).collect();
            splits.push(bytes.chunks(1).collect());
            for parts in splits {
                let segments = Segments::new(&parts);
                let found = find_key(&segments, "model");
                assert_eq!(found, whole, "{doc:?} in {} slices", parts.len());
                assert_eq!(
                    value(&found, &|span| segments.bytes(span).into_owned()),
                    expected,
                    "{doc:?}"
                );
            }
        }
    }

    /// Escapes and ends at every offset around the eight-byte steps agree with serde_json.
    #[test]
    fn strings_end_right_wherever_the_quote_or_escape_falls() {
        for before in 0..24 {
            for tail in [r#"\""#, r#"\\"#, r#"\\\""#, "", r#"\n"#] {
                let text = format!("{}{tail}", "x".repeat(before));
                let doc = format!(r#"{{"a":"{text}","model":"{text}"}}"#);
                let value: serde_json::Value = serde_json::from_str(&doc).unwrap();
                assert_eq!(
                    span_text(&doc).map(|span| serde_json::from_str::<serde_json::Value>(span).unwrap()),
                    Some(value["model"].clone()),
                    "{doc}"
                );
            }
        }
    }
}
