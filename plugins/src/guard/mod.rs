//! The guard family: one engine that finds, masks, rejects or reports text in request and
//! response bodies and streams ([`engine`]), and the plugins and detectors built on it.

pub(crate) mod engine;
pub mod injection_classifier;
pub mod pii;
pub mod pii_guard;
pub mod prompt_guard;

pub(crate) use engine::*;
