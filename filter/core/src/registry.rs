//! Plugin types by name. Built-ins are registered in one function of the plugins crate; a third
//! party builds its own filter by registering more factories next to them.

use crate::error::ConfigError;
use crate::metrics::{Counter, Gauge};
use crate::plugin::Plugin;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What a factory may use while building a plugin.
#[derive(Debug)]
pub struct BuildContext {
    processor_name: String,
    counters: Vec<String>,
    gauges: Vec<String>,
}

impl BuildContext {
    pub(crate) fn new(processor_name: &str) -> Self {
        Self {
            processor_name: processor_name.to_string(),
            counters: Vec::new(),
            gauges: Vec::new(),
        }
    }

    /// The name of the processor being built.
    pub fn processor_name(&self) -> &str {
        &self.processor_name
    }

    /// Declares a counter `processor.<name>.<counter>`; increment it with [`crate::Context::increment`].
    pub fn counter(&mut self, name: &str) -> Counter {
        self.counters.push(name.to_string());
        Counter(self.counters.len() - 1)
    }

    /// Declares a gauge `processor.<name>.<gauge>`; set it with [`crate::Context::set_gauge`].
    pub fn gauge(&mut self, name: &str) -> Gauge {
        self.gauges.push(name.to_string());
        Gauge(self.gauges.len() - 1)
    }

    pub(crate) fn into_metrics(self) -> (Vec<String>, Vec<String>) {
        (self.counters, self.gauges)
    }

    /// Reads a file named in the configuration (model weights, tables) through the reader the
    /// host installed with [`set_file_reader`]. Hosts without files (the `.wasm`) install none,
    /// and the error says so.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>, String> {
        match FILE_READER.get() {
            Some(read) => read(path),
            None => Err("this form of the filter cannot read files (the proxy-wasm sandbox has no file system)".into()),
        }
    }

    /// Deserializes the processor's `parameters` into its typed config. A missing `parameters`
    /// reads as an empty mapping, so defaults apply. Error paths are relative to `parameters`.
    pub fn parameters<T: serde::de::DeserializeOwned>(&self, parameters: &serde_json::Value) -> Result<T, ConfigError> {
        let empty = serde_json::Value::Object(Default::default());
        ConfigError::parse_value(if parameters.is_null() { &empty } else { parameters })
    }
}

/// Reads a whole file; installed once by a host that has a file system.
pub type FileReader = fn(&str) -> Result<Vec<u8>, String>;

static FILE_READER: std::sync::OnceLock<FileReader> = std::sync::OnceLock::new();

/// Installs the host's file reader (the core and plugins never touch a file system
/// themselves). Later calls are ignored: one process has one host.
pub fn set_file_reader(reader: FileReader) {
    let _ = FILE_READER.set(reader);
}

/// The signature of a plain factory function, the usual way to write a plugin's factory.
pub type BuildFn = fn(&serde_json::Value, &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError>;

/// Builds plugins of one type from their parameters. All parsing and compiling happens here,
/// once per configuration load.
pub trait PluginFactory: Send + Sync {
    /// Builds a plugin. Errors carry paths relative to `parameters`.
    fn build(&self, parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError>;
}

impl<F> PluginFactory for F
where
    F: Fn(&serde_json::Value, &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> + Send + Sync,
{
    fn build(&self, parameters: &serde_json::Value, ctx: &mut BuildContext) -> Result<Arc<dyn Plugin>, ConfigError> {
        self(parameters, ctx)
    }
}

/// Why a factory could not be registered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The type name is already taken.
    #[error("plugin type {0:?} is already registered")]
    Duplicate(String),
    /// The type name is not kebab-case.
    #[error("plugin type {0:?} is not a kebab-case name")]
    InvalidName(String),
}

/// Plugin type name -> factory.
#[derive(Default)]
pub struct Registry {
    factories: BTreeMap<String, Box<dyn PluginFactory>>,
    schemas: BTreeMap<String, SchemaFn>,
}

/// Writes the JSON Schema of one plugin type's `parameters` (definitions go to the generator).
type SchemaFn = fn(&mut schemars::SchemaGenerator) -> schemars::Schema;

fn parameters_schema<C: schemars::JsonSchema>(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    generator.subschema_for::<C>()
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a factory under a kebab-case type name.
    pub fn register(&mut self, type_name: &str, factory: impl PluginFactory + 'static) -> Result<(), RegistryError> {
        let valid = !type_name.is_empty()
            && type_name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !type_name.starts_with('-')
            && !type_name.ends_with('-');
        if !valid {
            return Err(RegistryError::InvalidName(type_name.to_string()));
        }
        if self.factories.contains_key(type_name) {
            return Err(RegistryError::Duplicate(type_name.to_string()));
        }
        self.factories.insert(type_name.to_string(), Box::new(factory));
        Ok(())
    }

    /// Registers a factory whose `parameters` deserialize into `C`, so that the chain's JSON
    /// Schema ([`Registry::chain_schema`]) describes them. Types registered with
    /// [`Registry::register`] accept any `parameters` object in the schema.
    pub fn register_typed<C: schemars::JsonSchema>(
        &mut self,
        type_name: &str,
        factory: impl PluginFactory + 'static,
    ) -> Result<(), RegistryError> {
        self.register(type_name, factory)?;
        self.schemas.insert(type_name.to_string(), parameters_schema::<C>);
        Ok(())
    }

    /// The JSON Schema (draft 2020-12) of a whole chain configuration with this registry's
    /// plugin types: `type` is one of them, and `parameters` follows the type's own schema.
    pub fn chain_schema(&self) -> serde_json::Value {
        let mut generator = schemars::generate::SchemaSettings::draft2020_12().into_generator();
        let mut branches = Vec::new();
        for (type_name, schema_fn) in &self.schemas {
            let parameters = serde_json::to_value(schema_fn(&mut generator)).unwrap_or_default();
            branches.push(serde_json::json!({
                "if": {"properties": {"type": {"const": type_name}}, "required": ["type"]},
                "then": {"properties": {"parameters": parameters}},
            }));
        }
        let mut root = serde_json::to_value(generator.root_schema_for::<crate::FilterConfig>()).unwrap_or_default();
        if let Some(processor) = root.pointer_mut("/$defs/ProcessorConfig") {
            processor["properties"]["type"]["enum"] = self.type_names().collect();
            processor["allOf"] = serde_json::Value::Array(branches);
        }
        root["title"] = "envoy-payload-processor chain configuration".into();
        root
    }

    /// The registered type names, sorted.
    pub fn type_names(&self) -> impl Iterator<Item = &str> {
        self.factories.keys().map(String::as_str)
    }

    pub(crate) fn factory(&self, type_name: &str) -> Result<&dyn PluginFactory, String> {
        self.factories
            .get(type_name)
            .map(|factory| factory.as_ref())
            .ok_or_else(|| {
                let known: Vec<&str> = self.type_names().collect();
                format!("unknown plugin type {type_name:?}; known types: {}", known.join(", "))
            })
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("types", &self.factories.keys().collect::<Vec<_>>())
            .finish()
    }
}
