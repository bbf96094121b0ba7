//! One configuration vocabulary: camelCase keys, PascalCase enum values, as in the Kubernetes
//! and Gateway API resources users write next to this filter (`EnvoyExtensionPolicy`).
//!
//! Enum values spelt the older ways (`credit_card`, `prompt-injection`, `setDefault`) are still
//! accepted for one release, with a deprecation warning in the proxy's log. [`config_enum!`]
//! declares such an enum once: its variants, canonical spellings, accepted old spellings, the
//! deserializer with a clear error for unknown values, and its JSON Schema.

#[doc(hidden)]
pub use schemars;
#[doc(hidden)]
pub use serde;

/// Logs, once per process and old spelling, that a configuration used a deprecated spelling.
pub fn warn_deprecated_spelling(old: &str, new: &str) {
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    static WARNED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let first = WARNED
        .lock()
        .map(|mut warned| warned.insert(old.to_string()))
        .unwrap_or(true);
    if first {
        log::warn!(
            "payload-processor: configuration value {old:?} is a deprecated spelling; write {new:?} \
             (enum values are PascalCase; the old spelling is accepted until the next release)"
        );
    }
}

/// Declares a configuration enum with PascalCase values and deprecated aliases.
///
/// ```
/// payload_processor_core::config_enum! {
///     /// How loud.
///     pub enum Volume {
///         /// Quiet.
///         Low = "Low" | "low",
///         /// Loud.
///         High = "High",
///     }
/// }
/// let v: Volume = serde_json::from_str("\"low\"").unwrap();
/// assert_eq!(v, Volume::Low);
/// assert_eq!(Volume::High.spelling(), "High");
/// assert!(serde_json::from_str::<Volume>("\"Medium\"").unwrap_err().to_string().contains("expected `Low` or `High`"));
/// ```
#[macro_export]
macro_rules! config_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident = $spelling:literal $(| $old:literal)*
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        #[allow(dead_code)]
        impl $name {
            /// Every value, in declaration order.
            pub const VALUES: &'static [$name] = &[$($name::$variant),+];
            /// The canonical spellings, in declaration order.
            pub const SPELLINGS: &'static [&'static str] = &[$($spelling),+];

            /// The canonical (PascalCase) spelling of this value.
            pub fn spelling(self) -> &'static str {
                match self {
                    $($name::$variant => $spelling,)+
                }
            }

            /// Reads a spelling, canonical or deprecated (the latter logs a warning once).
            pub fn from_spelling(text: &str) -> Option<Self> {
                match text {
                    $($spelling => Some($name::$variant),)+
                    $($(
                        $old => {
                            $crate::vocabulary::warn_deprecated_spelling($old, $spelling);
                            Some($name::$variant)
                        }
                    )*)+
                    _ => None,
                }
            }
        }

        impl<'de> $crate::vocabulary::serde::Deserialize<'de> for $name {
            fn deserialize<D: $crate::vocabulary::serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
                let text: std::borrow::Cow<'de, str> = $crate::vocabulary::serde::Deserialize::deserialize(de)?;
                $name::from_spelling(&text).ok_or_else(|| {
                    <D::Error as $crate::vocabulary::serde::de::Error>::unknown_variant(&text, $name::SPELLINGS)
                })
            }
        }

        impl $crate::vocabulary::schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut $crate::vocabulary::schemars::SchemaGenerator) -> $crate::vocabulary::schemars::Schema {
                let deprecated: &[&str] = &[$($($old,)*)+];
                $crate::vocabulary::schemars::json_schema!({
                    "type": "string",
                    "enum": $name::SPELLINGS,
                    "x-deprecated-spellings": deprecated,
                })
            }
        }
    };
}

#[cfg(test)]
mod tests {
    crate::config_enum! {
        /// Test enum.
        pub enum Colour {
            /// R.
            DeepRed = "DeepRed" | "deep_red" | "deep-red",
            /// B.
            Blue = "Blue",
        }
    }

    #[test]
    fn canonical_and_old_spellings_read_the_same_value() {
        for text in ["\"DeepRed\"", "\"deep_red\"", "\"deep-red\""] {
            assert_eq!(serde_json::from_str::<Colour>(text).unwrap(), Colour::DeepRed, "{text}");
        }
        assert_eq!(Colour::DeepRed.spelling(), "DeepRed");
    }

    #[test]
    fn unknown_values_name_the_canonical_spellings_only() {
        let err = serde_json::from_str::<Colour>("\"blue\"").unwrap_err().to_string();
        assert!(
            err.contains("unknown variant `blue`, expected `DeepRed` or `Blue`"),
            "{err}"
        );
    }

    #[test]
    fn schema_lists_canonical_values() {
        let schema = schemars::schema_for!(Colour);
        let value = serde_json::to_value(&schema).unwrap();
        assert_eq!(value["enum"], serde_json::json!(["DeepRed", "Blue"]));
    }
}
