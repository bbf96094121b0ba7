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
use std::ops::Range;

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
pub(crate) fn find_key(json: &[u8], key: &str) -> Result<Found, Unsure> {
    let mut pos = skip_ws(json, 0);
    expect(json, pos, b'{')?;
    pos = skip_ws(json, pos + 1);
    let mut found = None;
    if json.get(pos) == Some(&b'}') {
        pos += 1;
    } else {
        loop {
            let (name_end, value_start) = member_name(json, pos)?;
            let is_key = key_equals(&json[pos..name_end], key)?;
            pos = skip_value(json, value_start)?;
            if is_key {
                if found.is_some() {
                    return Ok(Found::Twice);
                }
                found = Some(value_start..pos);
            }
            pos = skip_ws(json, pos);
            match json.get(pos) {
                Some(b',') => pos = skip_ws(json, pos + 1),
                Some(b'}') => {
                    pos += 1;
                    break;
                }
                _ => return Err(Unsure),
            }
        }
    }
    if skip_ws(json, pos) != json.len() {
        return Err(Unsure);
    }
    Ok(found.map_or(Found::Absent, Found::Once))
}

fn expect(json: &[u8], pos: usize, byte: u8) -> Result<(), Unsure> {
    if json.get(pos) == Some(&byte) {
        Ok(())
    } else {
        Err(Unsure)
    }
}

fn skip_ws(json: &[u8], mut pos: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = json.get(pos) {
        pos += 1;
    }
    pos
}

/// Does the quoted key (quotes included) equal `key`? Keys must be valid UTF-8, as serde_json
/// requires when it reads them; escaped keys are decoded by serde_json.
fn key_equals(quoted: &[u8], key: &str) -> Result<bool, Unsure> {
    let inner = &quoted[1..quoted.len() - 1];
    if memchr(b'\\', inner).is_none() {
        std::str::from_utf8(inner).map_err(|_| Unsure)?;
        return Ok(inner == key.as_bytes());
    }
    let decoded: String = serde_json::from_slice(quoted).map_err(|_| Unsure)?;
    Ok(decoded == key)
}

/// From just after an opening quote to just after the closing one. A quote closes the string
/// unless an odd run of backslashes precedes it (`\\` is an escaped backslash, `\"` an
/// escaped quote), so one `memchr` for quotes finds the end.
fn skip_string(json: &[u8], mut pos: usize) -> Result<usize, Unsure> {
    let start = pos;
    loop {
        let at = pos + memchr(b'"', json.get(pos..).ok_or(Unsure)?).ok_or(Unsure)?;
        let backslashes = json[start..at].iter().rev().take_while(|&&b| b == b'\\').count();
        if backslashes % 2 == 0 {
            return Ok(at + 1);
        }
        pos = at + 1;
    }
}

/// Skips one value starting at `pos` (no leading whitespace). Iterative: nesting depth costs a
/// byte of heap per level, never stack.
fn skip_value(json: &[u8], mut pos: usize) -> Result<usize, Unsure> {
    // The closing bracket each open container waits for.
    let mut open: Vec<u8> = Vec::new();
    loop {
        // A value.
        match json.get(pos) {
            Some(b'"') => pos = skip_string(json, pos + 1)?,
            Some(&opener @ (b'{' | b'[')) => {
                let closer = if opener == b'{' { b'}' } else { b']' };
                pos = skip_ws(json, pos + 1);
                if json.get(pos) == Some(&closer) {
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
            match json.get(pos) {
                Some(b',') => {
                    pos = skip_ws(json, pos + 1);
                    if closer == b'}' {
                        pos = member_name(json, pos)?.1;
                    }
                    break;
                }
                Some(&byte) if byte == closer => {
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
fn member_name(json: &[u8], pos: usize) -> Result<(usize, usize), Unsure> {
    expect(json, pos, b'"')?;
    let name_end = skip_string(json, pos + 1)?;
    let colon = skip_ws(json, name_end);
    expect(json, colon, b':')?;
    Ok((name_end, skip_ws(json, colon + 1)))
}

fn skip_literal(json: &[u8], pos: usize, literal: &[u8]) -> Result<usize, Unsure> {
    if json.get(pos..pos + literal.len()) == Some(literal) {
        Ok(pos + literal.len())
    } else {
        Err(Unsure)
    }
}

/// A number as JSON spells it: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
fn skip_number(json: &[u8], mut pos: usize) -> Result<usize, Unsure> {
    let digits = |json: &[u8], mut pos: usize| {
        let start = pos;
        while json.get(pos).is_some_and(u8::is_ascii_digit) {
            pos += 1;
        }
        (pos, pos > start)
    };
    if json.get(pos) == Some(&b'-') {
        pos += 1;
    }
    match json.get(pos) {
        Some(b'0') => pos += 1,
        Some(b'1'..=b'9') => pos = digits(json, pos).0,
        _ => return Err(Unsure),
    }
    if json.get(pos) == Some(&b'.') {
        let (end, any) = digits(json, pos + 1);
        if !any {
            return Err(Unsure);
        }
        pos = end;
    }
    if let Some(b'e' | b'E') = json.get(pos) {
        pos += 1;
        if let Some(b'+' | b'-') = json.get(pos) {
            pos += 1;
        }
        let (end, any) = digits(json, pos);
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
        assert_eq!(find_key(b"{\"\xff\":1}", "model"), Err(Unsure));
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
}
