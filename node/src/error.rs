//! The node's errors, as callers see them.
//!
//! Messages are written for the caller and never echo secret values or tokens; engine
//! details go to the log (without values), not to the client. `code()` is stable and is what
//! audit events record.

use arca_store::StoreError;

use crate::barrier::BarrierError;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApiError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("missing, invalid or expired token")]
    Unauthenticated,
    #[error("permission denied")]
    PermissionDenied,
    #[error("not found: {0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("the node is sealed")]
    Sealed,
    #[error("the node is not initialized: run `arca operator init`")]
    NotInitialized,
    #[error("storage unavailable: the request was not served")]
    Unavailable,
    /// A store error inside a request's transaction: aborts the batch attempt (and is retried
    /// with it when retryable). Callers see it as `Unavailable`.
    #[error("storage unavailable: the request was not served")]
    Store(#[source] StoreError),
    #[error("internal error")]
    Internal,
    /// The secret version was revoked.
    #[error("{0}")]
    Revoked(String),
    /// This region does not accept writes (a standby, or a primary fenced by a newer epoch).
    #[error("this region does not accept writes: send writes to the primary region {primary:?}")]
    ReadOnlyRegion { primary: String },
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidArgument(message.into())
    }

    /// A stable, machine-readable code (recorded in audit events and metrics).
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidArgument(_) => "invalid_argument",
            ApiError::Unauthenticated => "unauthenticated",
            ApiError::PermissionDenied => "permission_denied",
            ApiError::NotFound(_) => "not_found",
            ApiError::FailedPrecondition(_) => "failed_precondition",
            ApiError::Sealed => "sealed",
            ApiError::NotInitialized => "not_initialized",
            ApiError::Unavailable | ApiError::Store(_) => "unavailable",
            ApiError::ReadOnlyRegion { .. } => "read_only_region",
            ApiError::Revoked(_) => "revoked",
            ApiError::Internal => "internal",
        }
    }

    /// Whether the audit log records this as a denial rather than an error.
    pub fn is_denial(&self) -> bool {
        matches!(self, ApiError::Unauthenticated | ApiError::PermissionDenied)
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        ApiError::Store(err)
    }
}

impl From<BarrierError> for ApiError {
    fn from(err: BarrierError) -> Self {
        match err {
            BarrierError::Sealed => ApiError::Sealed,
            BarrierError::AlreadyUnsealed => ApiError::FailedPrecondition(err.to_string()),
            BarrierError::InvalidShare(_) | BarrierError::InvalidParameters(_) => {
                ApiError::InvalidArgument(err.to_string())
            }
            BarrierError::WrongShares => ApiError::FailedPrecondition(err.to_string()),
            BarrierError::Authentication
            | BarrierError::Malformed
            | BarrierError::UnknownTerm(_)
            | BarrierError::CorruptSealData => {
                tracing::error!(error = %err, "barrier failed to open stored data");
                ApiError::Internal
            }
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(err: ApiError) -> Self {
        let message = err.to_string();
        match err {
            ApiError::InvalidArgument(_) => tonic::Status::invalid_argument(message),
            ApiError::Unauthenticated => tonic::Status::unauthenticated(message),
            ApiError::PermissionDenied => tonic::Status::permission_denied(message),
            ApiError::NotFound(_) => tonic::Status::not_found(message),
            ApiError::FailedPrecondition(_)
            | ApiError::NotInitialized
            | ApiError::ReadOnlyRegion { .. }
            | ApiError::Revoked(_) => tonic::Status::failed_precondition(message),
            ApiError::Sealed | ApiError::Unavailable | ApiError::Store(_) => {
                tonic::Status::unavailable(message)
            }
            ApiError::Internal => tonic::Status::internal(message),
        }
    }
}

impl arca_store::TxnError for ApiError {
    fn as_store_error(&self) -> Option<&StoreError> {
        match self {
            ApiError::Store(err) => Some(err),
            _ => None,
        }
    }
}
