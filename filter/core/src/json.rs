//! The request or response body as plugins see it: raw bytes, read lazily as JSON.
//!
//! Reading one field never builds a document tree: [`find_member`] walks the top-level object
//! with serde_json, skips the values it does not want without allocating, and stops at the
//! wanted key. A document is only parsed into a `serde_json::Value` when a plugin changes it
//! (or asks a JSONPath query that needs one), and bytes are only re-serialized when it changed.
//!
//! Duplicate keys are a parser-differential hazard (the gateway might route on the first
//! `model` while the model server reads the last), so a field that occurs twice is an error.

use jsonpath_rust::parser::model::{JpQuery, Segment, Selector};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use std::fmt;

mod scan;

/// Why a body could not be read as JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonError {
    /// Not well-formed JSON.
    #[error("body is not valid JSON: {0}")]
    Syntax(String),
    /// Well-formed, but the top level (or an intermediate value on a path) is not an object.
    #[error("body is not a JSON object at {0}")]
    NotAnObject(String),
    /// The same key appears twice in one object.
    #[error("body has duplicate key {0:?}")]
    DuplicateKey(String),
    /// A JSONPath could not be evaluated or cannot be used for this operation.
    #[error("JSONPath {0}")]
    Path(String),
}

/// Where a field lives: a chain of object member names, or a general JSONPath query.
#[derive(Debug, Clone)]
pub enum FieldPath {
    /// Object members from the root, read lazily (`model`, `$.metadata.tenant`).
    Members(Vec<String>),
    /// Any other JSONPath (wildcards, filters, indexes); needs a parsed document.
    Query {
        /// The original text, for messages.
        text: String,
        /// The compiled query.
        query: Box<JpQuery>,
    },
}

impl FieldPath {
    /// A plain name is one top-level key (dots included); text starting with `$` is a JSONPath.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("field name must not be empty".into());
        }
        if !text.starts_with('$') {
            return Ok(FieldPath::Members(vec![text.to_string()]));
        }
        let query =
            jsonpath_rust::parser::parse_json_path(text).map_err(|err| format!("invalid JSONPath {text:?}: {err}"))?;
        let members: Option<Vec<String>> = query
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Selector(Selector::Name(name)) => Some(unquote(name)),
                _ => None,
            })
            .collect();
        match members {
            Some(members) if !members.is_empty() => Ok(FieldPath::Members(members)),
            Some(_) => Err(format!("JSONPath {text:?} selects the whole document; name a field")),
            None => Ok(FieldPath::Query {
                text: text.to_string(),
                query: Box::new(query),
            }),
        }
    }

    /// Human-readable form for messages.
    pub fn describe(&self) -> String {
        match self {
            FieldPath::Members(members) => members.join("."),
            FieldPath::Query { text, .. } => text.clone(),
        }
    }
}

/// One step of a [`WritePath`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// An object member.
    Member(String),
    /// An array element; negative counts from the end (`-1` is the last).
    Index(i64),
}

/// A path that addresses exactly one value, so it can be written: member names and array
/// indexes (`$.messages[0].content`, `$.messages[-1]`, `$['odd.key']`); a plain name is one
/// top-level key. Wildcards, slices and filters select many values and are refused.
#[derive(Debug, Clone)]
pub struct WritePath {
    text: String,
    steps: Vec<Step>,
}

impl WritePath {
    /// Parses a field name or a single-value JSONPath.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("path must not be empty".into());
        }
        if !text.starts_with('$') {
            return Ok(Self {
                text: text.to_string(),
                steps: vec![Step::Member(text.to_string())],
            });
        }
        let query =
            jsonpath_rust::parser::parse_json_path(text).map_err(|err| format!("invalid JSONPath {text:?}: {err}"))?;
        let steps: Option<Vec<Step>> = query
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Selector(Selector::Name(name)) => Some(Step::Member(unquote(name))),
                Segment::Selector(Selector::Index(index)) => Some(Step::Index(*index)),
                _ => None,
            })
            .collect();
        match steps {
            Some(steps) if !steps.is_empty() => Ok(Self {
                text: text.to_string(),
                steps,
            }),
            Some(_) => Err(format!("JSONPath {text:?} selects the whole document; name a field")),
            None => Err(format!(
                "JSONPath {text:?} may select several values; use member names and indexes only"
            )),
        }
    }

    /// The path as configured.
    pub fn describe(&self) -> &str {
        &self.text
    }

    /// The value at the path, if present.
    pub fn get<'v>(&self, doc: &'v Value) -> Option<&'v Value> {
        self.steps.iter().try_fold(doc, |node, step| step_into(node, step))
    }

    /// The value at the path, for editing, if present.
    pub fn get_mut<'v>(&self, doc: &'v mut Value) -> Option<&'v mut Value> {
        self.steps.iter().try_fold(doc, |node, step| step_into_mut(node, step))
    }

    /// Sets the value, creating missing objects for member steps. An index must exist.
    pub fn set(&self, doc: &mut Value, value: Value) -> Result<(), JsonError> {
        let (last, parents) = self.steps.split_last().expect("never empty");
        let mut node = doc;
        for (depth, step) in parents.iter().enumerate() {
            node = match step {
                Step::Member(name) => node
                    .as_object_mut()
                    .ok_or_else(|| self.not_object(depth))?
                    .entry(name.clone())
                    .or_insert_with(|| Value::Object(Default::default())),
                Step::Index(_) => step_into_mut(node, step).ok_or_else(|| self.missing(depth))?,
            };
        }
        match last {
            Step::Member(name) => {
                node.as_object_mut()
                    .ok_or_else(|| self.not_object(parents.len()))?
                    .insert(name.clone(), value);
            }
            Step::Index(_) => *step_into_mut(node, last).ok_or_else(|| self.missing(parents.len()))? = value,
        }
        Ok(())
    }

    /// Removes the value; returns it when it was present.
    pub fn remove(&self, doc: &mut Value) -> Option<Value> {
        let (last, parents) = self.steps.split_last().expect("never empty");
        let parent = parents.iter().try_fold(doc, |node, step| step_into_mut(node, step))?;
        match (last, parent) {
            (Step::Member(name), Value::Object(object)) => object.shift_remove(name),
            (Step::Index(index), Value::Array(items)) => {
                let at = resolve_index(*index, items.len())?;
                Some(items.remove(at))
            }
            _ => None,
        }
    }

    fn not_object(&self, depth: usize) -> JsonError {
        JsonError::NotAnObject(format!("{} (step {})", self.text, depth + 1))
    }

    fn missing(&self, depth: usize) -> JsonError {
        JsonError::Path(format!("{}: no array element at step {}", self.text, depth + 1))
    }
}

/// A JSONPath that may select many values, for visiting them in place: member names, array
/// indexes and wildcards (`$.messages[*].content`, `$.choices[*].message.content`). Filters,
/// slices and descendant segments are refused.
#[derive(Debug, Clone)]
pub struct SelectPath {
    text: String,
    /// `None` is a wildcard: every member of an object, every element of an array.
    steps: Vec<Option<Step>>,
}

impl SelectPath {
    /// Parses a field name or a JSONPath of names, indexes and wildcards.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("path must not be empty".into());
        }
        if !text.starts_with('$') {
            return Ok(Self {
                text: text.to_string(),
                steps: vec![Some(Step::Member(text.to_string()))],
            });
        }
        let query =
            jsonpath_rust::parser::parse_json_path(text).map_err(|err| format!("invalid JSONPath {text:?}: {err}"))?;
        let steps = query
            .segments
            .iter()
            .map(|segment| match segment {
                Segment::Selector(Selector::Name(name)) => Ok(Some(Step::Member(unquote(name)))),
                Segment::Selector(Selector::Index(index)) => Ok(Some(Step::Index(*index))),
                Segment::Selector(Selector::Wildcard) => Ok(None),
                _ => Err(format!(
                    "JSONPath {text:?}: only member names, indexes and [*] wildcards are supported here"
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if steps.is_empty() {
            return Err(format!("JSONPath {text:?} selects the whole document; name a field"));
        }
        Ok(Self {
            text: text.to_string(),
            steps,
        })
    }

    /// The path as configured.
    pub fn describe(&self) -> &str {
        &self.text
    }

    /// Calls `visit` on every value the path selects, in document order.
    pub fn for_each<'v>(&self, doc: &'v Value, visit: &mut dyn FnMut(&'v Value)) {
        fn walk<'v>(node: &'v Value, steps: &[Option<Step>], visit: &mut dyn FnMut(&'v Value)) {
            let Some((step, rest)) = steps.split_first() else {
                return visit(node);
            };
            match (step, node) {
                (Some(step), _) => {
                    if let Some(child) = step_into(node, step) {
                        walk(child, rest, visit);
                    }
                }
                (None, Value::Array(items)) => items.iter().for_each(|item| walk(item, rest, visit)),
                (None, Value::Object(object)) => object.values().for_each(|item| walk(item, rest, visit)),
                (None, _) => {}
            }
        }
        walk(doc, &self.steps, visit);
    }

    /// Calls `visit` on every value the path selects, for editing, in document order.
    pub fn for_each_mut(&self, doc: &mut Value, visit: &mut dyn FnMut(&mut Value)) {
        fn walk(node: &mut Value, steps: &[Option<Step>], visit: &mut dyn FnMut(&mut Value)) {
            let Some((step, rest)) = steps.split_first() else {
                return visit(node);
            };
            match (step, node) {
                (Some(step), node) => {
                    if let Some(child) = step_into_mut(node, step) {
                        walk(child, rest, visit);
                    }
                }
                (None, Value::Array(items)) => items.iter_mut().for_each(|item| walk(item, rest, visit)),
                (None, Value::Object(object)) => object.values_mut().for_each(|item| walk(item, rest, visit)),
                (None, _) => {}
            }
        }
        walk(doc, &self.steps, visit);
    }
}

fn resolve_index(index: i64, len: usize) -> Option<usize> {
    let at = if index < 0 {
        len.checked_sub(usize::try_from(index.unsigned_abs()).ok()?)?
    } else {
        usize::try_from(index).ok()?
    };
    (at < len).then_some(at)
}

fn step_into<'v>(node: &'v Value, step: &Step) -> Option<&'v Value> {
    match (step, node) {
        (Step::Member(name), Value::Object(object)) => object.get(name),
        (Step::Index(index), Value::Array(items)) => items.get(resolve_index(*index, items.len())?),
        _ => None,
    }
}

fn step_into_mut<'v>(node: &'v mut Value, step: &Step) -> Option<&'v mut Value> {
    match (step, node) {
        (Step::Member(name), Value::Object(object)) => object.get_mut(name),
        (Step::Index(index), Value::Array(items)) => {
            let at = resolve_index(*index, items.len())?;
            items.get_mut(at)
        }
        _ => None,
    }
}

/// jsonpath-rust keeps the quotes of bracketed names (`['a']`); a member name has none.
fn unquote(name: &str) -> String {
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && (bytes[0] == b'\'' || bytes[0] == b'"') && bytes[bytes.len() - 1] == bytes[0] {
        name[1..name.len() - 1].to_string()
    } else {
        name.to_string()
    }
}

/// Finds `key` in the JSON object `json` without building a tree. `Ok(None)` when absent.
///
/// The structural pass ([`scan`]) answers for well-formed bodies at close to `memchr` speed;
/// whatever it cannot vouch for is decided (and its error worded) by serde_json.
pub fn find_member<'a>(json: &'a [u8], key: &str) -> Result<Option<&'a RawValue>, JsonError> {
    // One pass over the whole object, even when the key comes first: a second occurrence
    // further on (perhaps spelled with escapes) must be refused, and reading on costs about
    // what searching the rest for the key and for escapes would.
    let span = match scan::find_key(json, key) {
        Ok(scan::Found::Absent) => return Ok(None),
        Ok(scan::Found::Twice) => return Err(JsonError::DuplicateKey(key.to_string())),
        Ok(scan::Found::Once(span)) => span,
        Err(scan::Unsure) => return find_member_by_serde(json, key),
    };
    // The value itself is checked in full (UTF-8, control characters) by serde_json.
    match serde_json::from_slice::<&RawValue>(&json[span]) {
        Ok(raw) => Ok(Some(raw)),
        Err(_) => find_member_by_serde(json, key),
    }
}

/// Where the top-level members `keys` are in the JSON object `json`, in one pass: each value's
/// span, its text as the client wrote it. Unlike [`find_member`] the values are not checked in
/// full (a reader that only hashes or copies them need not pay for it); the structure is, and
/// a key that occurs twice is an error.
pub fn find_member_spans<const N: usize>(
    json: &[u8],
    keys: [&str; N],
) -> Result<[Option<std::ops::Range<usize>>; N], JsonError> {
    match scan::find_keys(json, keys) {
        Ok(found) => spans(found, keys),
        // serde_json decides, and words the error.
        Err(scan::Unsure) => {
            let mut spans: [Option<std::ops::Range<usize>>; N] = std::array::from_fn(|_| None);
            for (span, key) in spans.iter_mut().zip(keys) {
                *span = find_member(json, key)?.map(|raw| {
                    let start = offset_in(json, raw.get().as_bytes());
                    start..start + raw.get().len()
                });
            }
            Ok(spans)
        }
    }
}

/// What the structural pass found for each key, as spans; a key found twice is an error.
fn spans<const N: usize>(
    found: [scan::Found; N],
    keys: [&str; N],
) -> Result<[Option<std::ops::Range<usize>>; N], JsonError> {
    let mut spans: [Option<std::ops::Range<usize>>; N] = std::array::from_fn(|_| None);
    for ((span, found), key) in spans.iter_mut().zip(found).zip(keys) {
        *span = match found {
            scan::Found::Absent => None,
            scan::Found::Once(range) => Some(range),
            scan::Found::Twice => return Err(JsonError::DuplicateKey(key.to_string())),
        };
    }
    Ok(spans)
}

/// [`find_member_spans`] over a body the host keeps in slices: each member's JSON text, at most
/// `limit` bytes of it, copied out (nothing else is). `None` when the structural pass cannot
/// vouch for the body; the caller then reads it whole.
pub(crate) fn member_texts_in_slices<const N: usize>(
    slices: &[&[u8]],
    keys: [&str; N],
    limit: usize,
) -> Option<Result<[Option<Vec<u8>>; N], JsonError>> {
    fn texts<S: scan::Source + ?Sized, const N: usize>(
        body: &S,
        keys: [&str; N],
        limit: usize,
    ) -> Option<Result<[Option<Vec<u8>>; N], JsonError>> {
        let found = scan::find_keys(body, keys).ok()?;
        Some(
            spans(found, keys)
                .map(|spans| spans.map(|span| span.map(|span| body.bytes(cut(span, limit)).into_owned()))),
        )
    }
    match slices {
        [one] => texts(*one, keys, limit),
        _ => texts(&scan::Segments::new(slices), keys, limit),
    }
}

/// The first `limit` bytes of `span`.
pub(crate) fn cut(span: std::ops::Range<usize>, limit: usize) -> std::ops::Range<usize> {
    span.start..span.end.min(span.start.saturating_add(limit))
}

/// [`find_member`] by serde_json alone: the authority on malformed bodies and their messages.
fn find_member_by_serde<'a>(json: &'a [u8], key: &str) -> Result<Option<&'a RawValue>, JsonError> {
    let mut found = None;
    let mut de = serde_json::Deserializer::from_slice(json);
    let scan = de::Deserializer::deserialize_any(&mut de, FirstMember { key, found: &mut found });
    let Some(raw) = found else {
        // Not found: the whole object was scanned (and so validated), or it is malformed.
        scan.map_err(|err| classify(err, "$"))?;
        de.end().map_err(|err| JsonError::Syntax(err.to_string()))?;
        return Ok(None);
    };
    // Found early: the scan stopped inside the object on purpose, so its error is expected.
    let end = offset_in(json, raw.get().as_bytes()) + raw.get().len();
    let rest = &json[end..];
    let quoted = format!("\"{key}\"");
    if memchr::memmem::find(rest, quoted.as_bytes()).is_some() || memchr::memmem::find(rest, b"\\u").is_some() {
        let count = count_members(json, key)?;
        if count > 1 {
            return Err(JsonError::DuplicateKey(key.to_string()));
        }
    }
    Ok(Some(raw))
}

/// Position of `inner` inside `outer` (inner is a sub-slice of outer).
fn offset_in(outer: &[u8], inner: &[u8]) -> usize {
    inner.as_ptr() as usize - outer.as_ptr() as usize
}

fn classify(err: serde_json::Error, at: &str) -> JsonError {
    if err.is_data() {
        JsonError::NotAnObject(at.to_string())
    } else {
        JsonError::Syntax(err.to_string())
    }
}

/// Counts the members named `key` in the object, scanning all of it.
fn count_members(json: &[u8], key: &str) -> Result<usize, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let count = de::Deserializer::deserialize_any(&mut de, CountMembers { key }).map_err(|err| classify(err, "$"))?;
    de.end().map_err(|err| JsonError::Syntax(err.to_string()))?;
    Ok(count)
}

/// Deserializes an object key and tells whether it equals the wanted one, borrowing when it can.
struct KeyEquals<'k>(&'k str);

impl<'de> DeserializeSeed<'de> for KeyEquals<'_> {
    type Value = bool;
    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<bool, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyEquals<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

struct FirstMember<'k, 'a> {
    key: &'k str,
    found: &'k mut Option<&'a RawValue>,
}

impl<'a> Visitor<'a> for FirstMember<'_, 'a> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'a>>(self, mut map: M) -> Result<(), M::Error> {
        while let Some(matches) = map.next_key_seed(KeyEquals(self.key))? {
            if matches {
                *self.found = Some(map.next_value::<&'a RawValue>()?);
                return Ok(());
            }
            map.next_value::<IgnoredAny>()?;
        }
        Ok(())
    }
}

struct CountMembers<'k> {
    key: &'k str,
}

impl<'de> Visitor<'de> for CountMembers<'_> {
    type Value = usize;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<usize, M::Error> {
        let mut count = 0;
        while let Some(matches) = map.next_key_seed(KeyEquals(self.key))? {
            count += usize::from(matches);
            map.next_value::<IgnoredAny>()?;
        }
        Ok(count)
    }
}

/// Follows `members` from the root object lazily; `Ok(None)` when any member is absent.
pub fn find_path<'a>(json: &'a [u8], members: &[String]) -> Result<Option<&'a RawValue>, JsonError> {
    let mut current: &'a [u8] = json;
    let mut found = None;
    for (depth, member) in members.iter().enumerate() {
        if depth > 0 && !current.trim_ascii_start().starts_with(b"{") {
            return Ok(None);
        }
        match find_member(current, member)? {
            Some(raw) => {
                current = raw.get().as_bytes();
                found = Some(raw);
            }
            None => return Ok(None),
        }
    }
    Ok(found)
}

/// Reads the member path `members` of a body the host keeps in slices, in place: only the
/// value's bytes are copied (when they span two slices) and parsed. `None` when the
/// structural pass cannot vouch for the body; the caller then reads it whole, and serde_json
/// decides.
pub(crate) fn get_in_slices(slices: &[&[u8]], members: &[String]) -> Option<Result<Option<Value>, JsonError>> {
    match slices {
        // A small body is usually one slice: read it as one, with the fastest pass.
        [one] => get_in(*one, members),
        _ => get_in(&scan::Segments::new(slices), members),
    }
}

fn get_in<S: scan::Source + ?Sized>(body: &S, members: &[String]) -> Option<Result<Option<Value>, JsonError>> {
    let (first, rest) = members.split_first()?;
    let span = match scan::find_key(body, first) {
        Ok(scan::Found::Absent) => return Some(Ok(None)),
        Ok(scan::Found::Twice) => return Some(Err(JsonError::DuplicateKey(first.clone()))),
        Ok(scan::Found::Once(span)) => span,
        Err(scan::Unsure) => return None,
    };
    let value = body.bytes(span);
    if rest.is_empty() {
        // The value is checked in full here; a bad one is worded by the whole-body path.
        return serde_json::from_slice::<Value>(&value)
            .ok()
            .map(|value| Ok(Some(value)));
    }
    if !value.trim_ascii_start().starts_with(b"{") {
        return Some(Ok(None));
    }
    Some(find_path(&value, rest).and_then(|raw| {
        raw.map(|raw| serde_json::from_str(raw.get()).map_err(|err| JsonError::Syntax(err.to_string())))
            .transpose()
    }))
}

/// A body: the original bytes, plus a parsed document once a plugin needed one.
///
/// A body the engine has not read yet ([`Body::unread`]) stays in the host's buffers: a
/// plugin that reads one field gets it in place through [`crate::Context::body_field`], and
/// the bytes are only copied out when a plugin asks for the whole body
/// ([`crate::Context::body`]).
#[derive(Debug, Default)]
pub struct Body {
    raw: Vec<u8>,
    doc: Option<Value>,
    doc_changed: bool,
    bytes_replaced: bool,
    unread: bool,
}

impl Body {
    /// Wraps the bytes as received.
    pub fn new(raw: Vec<u8>) -> Self {
        Self { raw, ..Self::default() }
    }

    /// A body still in the host's buffers, read on first use.
    pub(crate) fn unread() -> Self {
        Self {
            unread: true,
            ..Self::default()
        }
    }

    /// True while the bytes are only in the host's buffers.
    pub(crate) fn is_unread(&self) -> bool {
        self.unread
    }

    /// The bytes of an unread body, read from the host.
    pub(crate) fn fill(&mut self, raw: Vec<u8>) {
        self.raw = raw;
        self.unread = false;
    }

    /// The bytes as received (or as last replaced); a parsed document's edits are not reflected.
    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    /// True when there is no body or only whitespace.
    pub fn is_blank(&self) -> bool {
        self.raw.iter().all(|b| b.is_ascii_whitespace())
    }

    /// True when the body was changed by a plugin.
    pub fn is_changed(&self) -> bool {
        self.doc_changed || self.bytes_replaced
    }

    /// Reads one field. A blank body has no fields.
    pub fn get(&mut self, path: &FieldPath) -> Result<Option<Value>, JsonError> {
        if self.doc.is_none() {
            if self.is_blank() {
                return Ok(None);
            }
            if let FieldPath::Members(members) = path {
                let raw = find_path(&self.raw, members)?;
                return raw
                    .map(|raw| serde_json::from_str(raw.get()).map_err(|err| JsonError::Syntax(err.to_string())))
                    .transpose();
            }
        }
        let doc = self.doc()?;
        Ok(match path {
            FieldPath::Members(members) => walk(doc, members).cloned(),
            FieldPath::Query { query, .. } => jsonpath_rust::query::js_path_process(query, doc)
                .map_err(|err| JsonError::Path(err.to_string()))?
                .first()
                .map(|found| found.clone().val().clone()),
        })
    }

    /// The parsed document (parsed on first use).
    pub fn doc(&mut self) -> Result<&Value, JsonError> {
        self.doc_mut_unchanged().map(|doc| &*doc)
    }

    /// The parsed document for editing; marks the body changed.
    pub fn doc_mut(&mut self) -> Result<&mut Value, JsonError> {
        self.doc_mut_unchanged()?;
        self.doc_changed = true;
        Ok(self.doc.as_mut().expect("parsed above"))
    }

    fn doc_mut_unchanged(&mut self) -> Result<&mut Value, JsonError> {
        if self.doc.is_none() {
            let doc: Value = if self.is_blank() {
                Value::Object(Default::default())
            } else {
                serde_json::from_slice(&self.raw).map_err(|err| classify(err, "$"))?
            };
            self.doc = Some(doc);
        }
        Ok(self.doc.as_mut().expect("set above"))
    }

    /// Sets a field, creating intermediate objects. Only member paths can be set.
    pub fn set(&mut self, path: &FieldPath, value: Value) -> Result<(), JsonError> {
        let FieldPath::Members(members) = path else {
            return Err(JsonError::Path(format!(
                "{} cannot be written; use a path of member names",
                path.describe()
            )));
        };
        // A value that already exists in a body nobody parsed yet is replaced where it stands:
        // no tree is built or serialized (a model rewrite on a 256 KiB prompt stays cheap) and
        // the rest of the body goes on byte-for-byte.
        if self.doc.is_none() && !self.is_blank() {
            let span = find_path(&self.raw, members)?.map(|raw| {
                let start = offset_in(&self.raw, raw.get().as_bytes());
                start..start + raw.get().len()
            });
            if let Some(span) = span {
                let text = serde_json::to_vec(&value).expect("a Value always serializes");
                self.raw.splice(span, text);
                self.bytes_replaced = true;
                return Ok(());
            }
        }
        let (last, parents) = members.split_last().expect("member paths are never empty");
        let mut node = self.doc_mut()?;
        for (depth, member) in parents.iter().enumerate() {
            let object = node
                .as_object_mut()
                .ok_or_else(|| JsonError::NotAnObject(members[..depth].join(".")))?;
            node = object
                .entry(member.clone())
                .or_insert_with(|| Value::Object(Default::default()));
        }
        let object = node
            .as_object_mut()
            .ok_or_else(|| JsonError::NotAnObject(parents.join(".")))?;
        object.insert(last.clone(), value);
        Ok(())
    }

    /// Removes a field; returns the old value.
    pub fn remove(&mut self, path: &FieldPath) -> Result<Option<Value>, JsonError> {
        let FieldPath::Members(members) = path else {
            return Err(JsonError::Path(format!(
                "{} cannot be removed; use a path of member names",
                path.describe()
            )));
        };
        if self.get(path)?.is_none() {
            return Ok(None);
        }
        let (last, parents) = members.split_last().expect("member paths are never empty");
        let doc = self.doc_mut()?;
        let parent = if parents.is_empty() {
            Some(doc)
        } else {
            walk_mut(doc, parents)
        };
        Ok(parent
            .and_then(Value::as_object_mut)
            .and_then(|object| object.shift_remove(last)))
    }

    /// Replaces the whole body.
    pub fn replace(&mut self, bytes: Vec<u8>) {
        self.raw = bytes;
        self.doc = None;
        self.doc_changed = false;
        self.bytes_replaced = true;
    }

    /// The body as it stands now, edits included (serialized when a parsed document changed).
    pub fn current(&self) -> std::borrow::Cow<'_, [u8]> {
        match &self.doc {
            Some(doc) if self.doc_changed => serde_json::to_vec(doc).expect("a Value always serializes").into(),
            _ => self.raw.as_slice().into(),
        }
    }

    /// The bytes to send on, when the body changed.
    pub fn take_changes(&mut self) -> Option<Vec<u8>> {
        if self.doc_changed {
            let doc = self.doc.as_ref().expect("a changed document exists");
            return Some(serde_json::to_vec(doc).expect("a Value always serializes"));
        }
        self.bytes_replaced.then(|| std::mem::take(&mut self.raw))
    }
}

fn walk<'v>(mut node: &'v Value, members: &[String]) -> Option<&'v Value> {
    for member in members {
        node = node.as_object()?.get(member)?;
    }
    Some(node)
}

fn walk_mut<'v>(mut node: &'v mut Value, members: &[String]) -> Option<&'v mut Value> {
    for member in members {
        node = node.as_object_mut()?.get_mut(member)?;
    }
    Some(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_paths_address_one_value_by_names_and_indexes() {
        let mut doc: Value = serde_json::from_str(r#"{"messages":[{"content":"a"},{"content":"b"}],"n":1}"#).unwrap();
        let last = WritePath::parse("$.messages[-1].content").unwrap();
        assert_eq!(last.get(&doc), Some(&Value::from("b")));
        last.set(&mut doc, "c".into()).unwrap();
        assert_eq!(doc["messages"][1]["content"], "c");
        WritePath::parse("$.a.b").unwrap().set(&mut doc, 1.into()).unwrap();
        assert_eq!(doc["a"]["b"], 1);
        assert!(WritePath::parse("$.messages[5].x")
            .unwrap()
            .set(&mut doc, 1.into())
            .is_err());
        assert!(WritePath::parse("$.n.x").unwrap().set(&mut doc, 1.into()).is_err());
        assert_eq!(
            WritePath::parse("$.messages[0]").unwrap().remove(&mut doc).unwrap()["content"],
            "a"
        );
        assert_eq!(doc["messages"].as_array().unwrap().len(), 1);
        for bad in ["$.messages[*]", "$..content", "$", "", "$.a[?@.b]"] {
            assert!(WritePath::parse(bad).is_err(), "{bad}");
        }
    }
    use serde_json::json;

    fn get(body: &str, path: &str) -> Result<Option<Value>, JsonError> {
        Body::new(body.as_bytes().to_vec()).get(&FieldPath::parse(path).unwrap())
    }

    #[test]
    fn reads_top_level_and_nested_members() {
        let body =
            r#"{"messages":[{"role":"user","content":"hi \"model\""}],"metadata":{"tenant":"acme"},"model":"m1"}"#;
        assert_eq!(get(body, "model").unwrap(), Some(json!("m1")));
        assert_eq!(get(body, "$.metadata.tenant").unwrap(), Some(json!("acme")));
        assert_eq!(get(body, "$['metadata']['tenant']").unwrap(), Some(json!("acme")));
        assert_eq!(get(body, "$.metadata.missing").unwrap(), None);
        assert_eq!(get(body, "$.model.deeper").unwrap(), None);
        assert_eq!(get(body, "absent").unwrap(), None);
    }

    #[test]
    fn general_jsonpath_queries_use_the_parsed_document() {
        let body = r#"{"messages":[{"role":"system"},{"role":"user"}]}"#;
        assert_eq!(get(body, "$.messages[1].role").unwrap(), Some(json!("user")));
        assert!(matches!(
            FieldPath::parse("$.messages[*].role").unwrap(),
            FieldPath::Query { .. }
        ));
    }

    #[test]
    fn escaped_keys_are_decoded() {
        assert_eq!(get(r#"{"mod\u0065l":"x"}"#, "model").unwrap(), Some(json!("x")));
    }

    #[test]
    fn duplicate_keys_are_refused_even_when_escaped() {
        assert_eq!(
            get(r#"{"model":"a","model":"b"}"#, "model"),
            Err(JsonError::DuplicateKey("model".into()))
        );
        assert_eq!(
            get(r#"{"model":"a","x":1,"mod\u0065l":"b"}"#, "model"),
            Err(JsonError::DuplicateKey("model".into()))
        );
        // The quoted bytes inside a string value are not a key.
        assert_eq!(
            get(r#"{"model":"a","role":"model"}"#, "model").unwrap(),
            Some(json!("a"))
        );
    }

    #[test]
    fn malformed_and_non_object_bodies_are_errors() {
        assert!(matches!(get("not json", "model"), Err(JsonError::Syntax(_))));
        assert!(matches!(get(r#"{"a":1"#, "model"), Err(JsonError::Syntax(_))));
        assert!(matches!(get(r#"{"a":1} trailing"#, "model"), Err(JsonError::Syntax(_))));
        assert!(matches!(get("[1,2]", "model"), Err(JsonError::NotAnObject(_))));
        assert!(matches!(get("\"str\"", "model"), Err(JsonError::NotAnObject(_))));
        assert_eq!(get("  \n", "model").unwrap(), None);
    }

    #[test]
    fn deep_nesting_never_overflows_the_stack() {
        // Skipping is iterative: a deep but valid value before the field is read past.
        let deep = format!(
            "{{\"a\":{}{},\"model\":\"x\"}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert_eq!(get(&deep, "model").unwrap(), Some(json!("x")));
        // Building a document stops at serde_json's recursion limit with an error.
        let mut body = Body::new(deep.into_bytes());
        assert!(matches!(body.doc(), Err(JsonError::Syntax(_))));
        let unbalanced = format!("{{\"a\":{}", "[".repeat(100_000));
        assert!(matches!(get(&unbalanced, "model"), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn unchanged_body_has_no_changes_and_set_reserializes_in_order() {
        let mut body = Body::new(br#"{"b":1, "a":2}"#.to_vec());
        assert_eq!(body.get(&FieldPath::parse("a").unwrap()).unwrap(), Some(json!(2)));
        assert!(body.take_changes().is_none());
        body.set(&FieldPath::parse("$.x.y").unwrap(), json!("z")).unwrap();
        assert_eq!(body.get(&FieldPath::parse("$.x.y").unwrap()).unwrap(), Some(json!("z")));
        assert_eq!(body.remove(&FieldPath::parse("b").unwrap()).unwrap(), Some(json!(1)));
        assert_eq!(
            String::from_utf8(body.take_changes().unwrap()).unwrap(),
            r#"{"a":2,"x":{"y":"z"}}"#
        );
    }

    #[test]
    fn setting_an_existing_value_of_an_unparsed_body_keeps_every_other_byte() {
        let text = "{ \"messages\" : [ {\"content\": \"h\\u00e9\"} ],\n  \"meta\": {\"model\" : \"a\" }, \"model\" :\t\"llama\" }";
        let mut body = Body::new(text.as_bytes().to_vec());
        body.set(&FieldPath::parse("model").unwrap(), json!("new \"one\""))
            .unwrap();
        body.set(&FieldPath::parse("$.meta.model").unwrap(), json!({"k": [1]}))
            .unwrap();
        let out = String::from_utf8(body.take_changes().unwrap()).unwrap();
        assert_eq!(
            out,
            "{ \"messages\" : [ {\"content\": \"h\\u00e9\"} ],\n  \"meta\": {\"model\" : {\"k\":[1]} }, \"model\" :\t\"new \\\"one\\\"\" }"
        );
        // A duplicated key is refused rather than guessing which one a server would read.
        let mut twice = Body::new(br#"{"model":"a","model":"b"}"#.to_vec());
        assert!(matches!(
            twice.set(&FieldPath::parse("model").unwrap(), json!("c")),
            Err(JsonError::DuplicateKey(_))
        ));
        // An absent value still goes through the document.
        let mut absent = Body::new(br#"{"a": 1}"#.to_vec());
        absent.set(&FieldPath::parse("b").unwrap(), json!(2)).unwrap();
        assert_eq!(absent.take_changes().unwrap(), br#"{"a":1,"b":2}"#);
    }

    #[test]
    fn invalid_paths_are_refused() {
        assert!(FieldPath::parse("").is_err());
        assert!(FieldPath::parse("$[").is_err());
        assert!(FieldPath::parse("$").is_err());
    }

    #[test]
    fn member_spans_come_from_one_pass_and_agree_with_find_member() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
        let [model, messages, absent] = find_member_spans(body, ["model", "messages", "prompt"]).unwrap();
        assert_eq!(&body[model.unwrap()], br#""m""#);
        assert_eq!(&body[messages.unwrap()], br#"[{"role":"user","content":"hi"}]"#);
        assert_eq!(absent, None);
        // A duplicate, even escaped, is refused; a body the pass cannot vouch for goes to serde.
        assert!(matches!(
            find_member_spans(br#"{"model":"a","mod\u0065l":"b"}"#, ["model", "messages"]),
            Err(JsonError::DuplicateKey(_))
        ));
        assert!(matches!(
            find_member_spans(b"{\"model\":", ["model"]),
            Err(JsonError::Syntax(_))
        ));
        let spaced = b" { \"model\" : \"m\" } ";
        assert_eq!(
            &spaced[find_member_spans(spaced, ["model"]).unwrap()[0].clone().unwrap()],
            b"\"m\""
        );
    }

    #[test]
    fn member_texts_are_read_in_slices_and_cut_at_the_limit() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"a long prompt"}],"x":1}"#;
        for size in [1, 3, 7, body.len()] {
            let slices: Vec<&[u8]> = body.chunks(size).collect();
            let [model, messages, absent] = member_texts_in_slices(&slices, ["model", "messages", "prompt"], 12)
                .unwrap()
                .unwrap();
            assert_eq!(model.as_deref(), Some(&br#""m""#[..]), "slices of {size}");
            assert_eq!(messages.as_deref(), Some(&br#"[{"role":"us"#[..]));
            assert_eq!(absent, None);
        }
        let twice = br#"{"model":"a","model":"b"}"#;
        assert!(matches!(
            member_texts_in_slices(&[&twice[..5], &twice[5..]], ["model"], 10),
            Some(Err(JsonError::DuplicateKey(_)))
        ));
        assert!(member_texts_in_slices(&[b"{\"model\":"], ["model"], 10).is_none());
    }
}
