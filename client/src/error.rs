//! The SDK's one error type: a kind to match on, questions to ask (`is_retryable`,
//! `is_maybe_committed`), and the node's own message and audit position when a node answered.

use std::fmt;

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The client's configuration (addresses, TLS files, arguments such as paths).
    Config,
    /// The request was not sent: no connection could be made, or the connection it was
    /// queued on closed before it went out (a node recycling its connections).
    Connect,
    /// The connection failed after the request may have been sent.
    Transport,
    /// Missing, invalid or expired token (or a refused login).
    Unauthenticated,
    /// The token's policies do not allow this.
    PermissionDenied,
    NotFound,
    InvalidArgument,
    /// The node is sealed: nothing was served.
    Sealed,
    /// The node could not serve the request (storage or audit log unavailable): nothing was
    /// served.
    Unavailable,
    /// A write reached a region that does not take writes.
    ReadOnlyRegion {
        primary: String,
    },
    /// Check-and-set mismatch, uninitialized node, and other refused preconditions.
    FailedPrecondition,
    Internal,
}

/// An error from the client or from a node.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    node: Option<String>,
    audit_position: Option<String>,
    request_id: Option<String>,
}

/// The response metadata key carrying the audit position of the request's durable event.
pub const AUDIT_POSITION_HEADER: &str = "x-arca-audit-position";
/// The response metadata key carrying the request id recorded in the audit event.
pub const REQUEST_ID_HEADER: &str = "x-arca-request-id";
/// On a refused write: the region that takes writes.
pub const PRIMARY_REGION_HEADER: &str = "x-arca-primary-region";
/// On a request: wrap the answer for this long (a duration: `60`, `60s`, `5m`, `1h`).
pub const WRAP_TTL_HEADER: &str = "x-arca-wrap-ttl";
/// On a wrapped answer: the wrapping token (`arcaw_…`), its accessor, its TTL in seconds and
/// the gRPC method whose answer it wraps.
pub const WRAP_TOKEN_HEADER: &str = "x-arca-wrap-token";
pub const WRAP_ACCESSOR_HEADER: &str = "x-arca-wrap-accessor";
pub const WRAP_TTL_SECS_HEADER: &str = "x-arca-wrap-ttl-secs";
pub const WRAP_CREATION_PATH_HEADER: &str = "x-arca-wrap-creation-path";

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Error {
        Error {
            kind: ErrorKind::Config,
            message: message.into(),
            node: None,
            audit_position: None,
            request_id: None,
        }
    }

    /// Classifies a gRPC status from `node`. A status carrying a request id came from arca;
    /// one without it came from the transport.
    pub(crate) fn from_status(status: &tonic::Status, node: &str) -> Error {
        let meta = |key: &str| status.metadata().get(key).and_then(|v| v.to_str().ok()).map(str::to_owned);
        let request_id = meta(REQUEST_ID_HEADER);
        let message = status.message().to_owned();
        use tonic::Code;
        let kind = match status.code() {
            Code::Unauthenticated => ErrorKind::Unauthenticated,
            Code::PermissionDenied => ErrorKind::PermissionDenied,
            Code::NotFound => ErrorKind::NotFound,
            Code::InvalidArgument | Code::OutOfRange => ErrorKind::InvalidArgument,
            Code::FailedPrecondition => match meta(PRIMARY_REGION_HEADER) {
                Some(primary) => ErrorKind::ReadOnlyRegion { primary },
                None => ErrorKind::FailedPrecondition,
            },
            Code::Unavailable if request_id.is_some() => {
                if message.contains("sealed") {
                    ErrorKind::Sealed
                } else {
                    ErrorKind::Unavailable
                }
            }
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                if request_id.is_none() =>
            {
                let text = format!("{message} {:?}", std::error::Error::source(status));
                if never_sent(status)
                    || [
                        "tcp connect",
                        "trying to connect",
                        "Connection refused",
                        "dns error",
                        "No route to host",
                    ]
                    .iter()
                    .any(|m| text.contains(m))
                {
                    ErrorKind::Connect
                } else {
                    ErrorKind::Transport
                }
            }
            // The HTTP/2 layer's own failure (the node closing the connection, a reset), not
            // an answer from arca: the request may or may not have been served.
            Code::Internal if request_id.is_none() && hyper_error(status).is_some() => ErrorKind::Transport,
            _ => ErrorKind::Internal,
        };
        Error {
            kind,
            message,
            node: Some(node.to_owned()),
            audit_position: meta(AUDIT_POSITION_HEADER),
            request_id,
        }
    }

    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The node's message (never contains secret values), or the client's own.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The node that answered (or could not be reached).
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// Where the node's audit log recorded this failed request (denials and errors are audited).
    pub fn audit_position(&self) -> Option<&str> {
        self.audit_position.as_deref()
    }

    pub fn request_id(&self) -> Option<&str> {
        self.request_id.as_deref()
    }

    /// Whether trying again (on this or another node) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.kind,
            ErrorKind::Connect | ErrorKind::Transport | ErrorKind::Sealed | ErrorKind::Unavailable
        )
    }

    /// Whether a write that failed this way may nevertheless have been committed: only when the
    /// connection broke after the request was sent. Every other error means it was not.
    pub fn is_maybe_committed(&self) -> bool {
        self.kind == ErrorKind::Transport
    }
}

/// The first hyper error in the status's source chain: the transport's own failure.
fn hyper_error(status: &tonic::Status) -> Option<&hyper::Error> {
    let mut source = std::error::Error::source(status);
    while let Some(err) = source {
        if let Some(hyper) = err.downcast_ref::<hyper::Error>() {
            return Some(hyper);
        }
        source = err.source();
    }
    None
}

/// Whether hyper dropped the request before sending any of it: it was still queued when its
/// connection closed (hyper returns such a request as "canceled"; a node that recycles its
/// connections closes them). Sending it again cannot apply it twice.
fn never_sent(status: &tonic::Status) -> bool {
    hyper_error(status).is_some_and(hyper::Error::is_canceled)
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.node) {
            (ErrorKind::Connect, Some(node)) => write!(f, "cannot connect to {node}: {}", self.message),
            (ErrorKind::Transport, Some(node)) => write!(f, "connection to {node} failed: {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(status: tonic::Status) -> tonic::Status {
        let mut status = status;
        status.metadata_mut().insert(REQUEST_ID_HEADER, "r-1".parse().unwrap());
        status.metadata_mut().insert(AUDIT_POSITION_HEADER, "00ff".parse().unwrap());
        status
    }

    #[test]
    fn statuses_are_classified() {
        let e = Error::from_status(&served(tonic::Status::unavailable("the node is sealed")), "n");
        assert_eq!(e.kind(), &ErrorKind::Sealed);
        assert_eq!(e.audit_position(), Some("00ff"));
        assert!(e.is_retryable() && !e.is_maybe_committed());
        let mut ro = served(tonic::Status::failed_precondition("this region does not accept writes"));
        ro.metadata_mut().insert(PRIMARY_REGION_HEADER, "eu".parse().unwrap());
        assert_eq!(Error::from_status(&ro, "n").kind(), &ErrorKind::ReadOnlyRegion { primary: "eu".into() });
        let cas = served(tonic::Status::failed_precondition("check-and-set mismatch"));
        assert_eq!(Error::from_status(&cas, "n").kind(), &ErrorKind::FailedPrecondition);
        let refused = tonic::Status::unavailable("tcp connect error: Connection refused (os error 111)");
        let e = Error::from_status(&refused, "http://x:1");
        assert_eq!(e.kind(), &ErrorKind::Connect);
        assert!(e.to_string().starts_with("cannot connect to http://x:1"));
        let reset = tonic::Status::unavailable("error reading a body from connection");
        let e = Error::from_status(&reset, "n");
        assert!(e.is_maybe_committed(), "{e:?}");
        assert_eq!(
            Error::from_status(&served(tonic::Status::permission_denied("no")), "n").kind(),
            &ErrorKind::PermissionDenied
        );
    }
}
