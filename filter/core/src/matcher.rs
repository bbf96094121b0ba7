//! Compiled match conditions of a processor, evaluated once per request at request headers.

use crate::config::{HeaderCondition, MatchConfig};
use crate::error::ConfigError;
use crate::host::{Direction, Host};
use regex::Regex;

#[derive(Debug, Clone)]
enum HeaderTest {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Present(bool),
}

#[derive(Debug, Clone)]
struct HeaderRule {
    name: String,
    test: HeaderTest,
}

/// When a processor runs. The empty matcher matches everything.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    path_prefixes: Vec<String>,
    methods: Vec<String>,
    headers: Vec<HeaderRule>,
}

impl Matcher {
    /// Compiles the conditions; errors are relative to the `match` key.
    pub fn compile(config: &MatchConfig) -> Result<Self, ConfigError> {
        for (i, prefix) in config.path_prefixes.iter().enumerate() {
            if !prefix.starts_with('/') {
                return Err(ConfigError::new(
                    format!("pathPrefixes[{i}]"),
                    format!("path prefix {prefix:?} must start with '/'"),
                ));
            }
        }
        let headers = config
            .headers
            .iter()
            .enumerate()
            .map(|(i, condition)| compile_header(condition).map_err(|err| err.within(&format!("headers[{i}]"))))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            path_prefixes: config.path_prefixes.clone(),
            methods: config.methods.iter().map(|m| m.to_ascii_uppercase()).collect(),
            headers,
        })
    }

    /// True when every condition holds for the request headers in `host`.
    pub fn matches(&self, host: &dyn Host) -> bool {
        if !self.path_prefixes.is_empty() {
            let path = host.header(Direction::Request, ":path").unwrap_or_default();
            let path = path.split(['?', '#']).next().unwrap_or_default();
            if !self
                .path_prefixes
                .iter()
                .any(|prefix| path.starts_with(prefix.as_str()))
            {
                return false;
            }
        }
        if !self.methods.is_empty() {
            let method = host.header(Direction::Request, ":method").unwrap_or_default();
            if !self.methods.iter().any(|m| m.eq_ignore_ascii_case(&method)) {
                return false;
            }
        }
        self.headers.iter().all(|rule| {
            let value = host.header(Direction::Request, &rule.name);
            match (&rule.test, value) {
                (HeaderTest::Present(expected), value) => value.is_some() == *expected,
                (HeaderTest::Exact(expected), Some(value)) => value == *expected,
                (HeaderTest::Prefix(prefix), Some(value)) => value.starts_with(prefix.as_str()),
                (HeaderTest::Regex(regex), Some(value)) => regex.is_match(&value),
                (_, None) => false,
            }
        })
    }
}

fn compile_header(condition: &HeaderCondition) -> Result<HeaderRule, ConfigError> {
    if condition.name.is_empty() {
        return Err(ConfigError::new("name", "header name must not be empty"));
    }
    let mut tests = Vec::new();
    if let Some(exact) = &condition.exact {
        tests.push(HeaderTest::Exact(exact.clone()));
    }
    if let Some(prefix) = &condition.prefix {
        tests.push(HeaderTest::Prefix(prefix.clone()));
    }
    if let Some(pattern) = &condition.regex {
        let regex =
            Regex::new(&format!("^(?:{pattern})$")).map_err(|err| ConfigError::new("regex", err.to_string()))?;
        tests.push(HeaderTest::Regex(regex));
    }
    if let Some(present) = condition.present {
        tests.push(HeaderTest::Present(present));
    }
    if tests.len() != 1 {
        return Err(ConfigError::new(
            "",
            "give exactly one of exact, prefix, regex, present",
        ));
    }
    Ok(HeaderRule {
        name: condition.name.to_ascii_lowercase(),
        test: tests.remove(0),
    })
}
