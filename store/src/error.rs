use std::path::PathBuf;

/// Errors of the store, its parsers and its sources.
///
/// Wrapping variants carry the inner error in a field that is deliberately not
/// a `#[source]`: the message already includes it, and error reporters that
/// walk the chain would otherwise print it twice.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `apiVersion`/`kind` pair that the store does not hold (wording follows kubectl).
    #[error("no matches for kind {kind:?} in version {api_version:?}")]
    UnknownKind { api_version: String, kind: String },
    /// A resource type name (as typed on a command line) that names no kind.
    #[error(
        "unknown resource type {0:?} (known: ingress, ingressclass, service, endpointslice, endpoints, secret, namespace, cec, ccec)"
    )]
    UnknownResource(String),
    /// An object or document that is malformed; the message names the field.
    #[error("{0}")]
    Invalid(String),
    /// A document that is not a Kubernetes object at all (no `apiVersion`
    /// and `kind`, or not a map): the watched directory ignores these.
    #[error("{0}")]
    NotManifest(String),
    /// An input or document over a size limit (checked before parsing).
    #[error(
        "{what} is {size} bytes, more than the limit of {limit} bytes ({})",
        human(*limit)
    )]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// Nesting deeper than the parser accepts (checked before parsing).
    #[error("nested deeper than {limit} levels")]
    TooDeep { limit: usize },
    /// An error inside one document of a multi-document text (1-based index).
    #[error("document {index}: {error}")]
    Document {
        index: usize,
        error: Box<StoreError>,
    },
    /// An error in one item of a `List` document (0-based index).
    #[error("items[{index}]: {error}")]
    Item {
        index: usize,
        error: Box<StoreError>,
    },
    /// Reading a file or directory failed.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The file watcher could not be set up or stopped delivering events.
    #[error("watching {}: {message}", path.display())]
    Watch { path: PathBuf, message: String },
}

/// A limit for messages: `1.5 MiB`, `256 KiB`.
fn human(bytes: usize) -> String {
    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;
    if bytes >= MIB {
        format!("{} MiB", bytes as f64 / MIB as f64)
    } else {
        format!("{} KiB", bytes as f64 / KIB as f64)
    }
}

impl StoreError {
    /// The innermost error, looking through document wrappers.
    pub fn root(&self) -> &StoreError {
        match self {
            StoreError::Document { error, .. } | StoreError::Item { error, .. } => error.root(),
            other => other,
        }
    }

    /// True when the document is not a Kubernetes object at all.
    pub fn is_not_manifest(&self) -> bool {
        matches!(self.root(), StoreError::NotManifest(_))
    }

    /// True when the error only says the kind is not one the store holds.
    pub fn is_unknown_kind(&self) -> bool {
        matches!(self.root(), StoreError::UnknownKind { .. })
    }
}
