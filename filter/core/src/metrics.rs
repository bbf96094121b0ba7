//! Handles of the metrics a processor declares, shared by the plugin API and background tasks
//! (so neither imports the other for them).

/// A processor-local counter declared at build time with [`crate::BuildContext::counter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter(pub(crate) usize);

/// A processor-local gauge declared at build time with [`crate::BuildContext::gauge`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauge(pub(crate) usize);
