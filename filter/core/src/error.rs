//! Configuration errors carry the path of the offending value, e.g.
//! `processors[1].parameters.fieldName: invalid type: integer 3, expected a string`.

use std::fmt;

/// A configuration that cannot be loaded, with the path of the value at fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted path from the config root (`processors[2].parameters.deny[0].regex`); empty for the root.
    pub path: String,
    /// What is wrong, for a human.
    pub message: String,
}

impl ConfigError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }

    /// Prefixes the path with an outer segment (`parameters` + `fieldName` -> `parameters.fieldName`).
    pub fn within(mut self, outer: &str) -> Self {
        self.path = join_path(outer, &self.path);
        self
    }

    /// Deserializes `value` into `T`, reporting the inner path of any error.
    pub fn parse_value<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Result<T, ConfigError> {
        serde_path_to_error::deserialize(value).map_err(|err| {
            let path = err.path().to_string();
            let path = if path == "." { String::new() } else { path };
            ConfigError::new(path, err.into_inner().to_string())
        })
    }
}

/// Joins two path fragments: `a` + `b` -> `a.b`, `a` + `[0].c` -> `a[0].c`.
pub fn join_path(outer: &str, inner: &str) -> String {
    match (outer.is_empty(), inner.is_empty()) {
        (true, _) => inner.to_string(),
        (_, true) => outer.to_string(),
        _ if inner.starts_with('[') => format!("{outer}{inner}"),
        _ => format!("{outer}.{inner}"),
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}
