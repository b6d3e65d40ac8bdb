//! The engine's one error vocabulary; each adapter maps [`ErrorKind`] to its own status codes.

use mqproxy_store::StoreError;

/// What kind of failure, for the adapters' status mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong (status 400 / gRPC InvalidArgument).
    InvalidArgument,
    /// A producer or consumer name the proxy does not know (400 / NotFound).
    NotFound,
    /// The server failed (500 / Internal).
    Internal,
    /// The server is shutting down or its store is closed (500 / Unavailable).
    Unavailable,
    /// A send timed out after it may have been stored: retry if every message must arrive
    /// (300 / DeadlineExceeded).
    OutcomeUnknown,
    /// A token is required and none was presented (401 / Unauthenticated).
    Unauthenticated,
    /// The token presented is not the entry's (403 / PermissionDenied).
    PermissionDenied,
    /// The store's disk is full; nothing was stored (507 / ResourceExhausted).
    StorageFull,
    /// Too many writes waiting; nothing was stored, retry shortly (503 + Retry-After /
    /// Unavailable).
    Overloaded,
    /// A bound on what clients may create is reached (429 / ResourceExhausted): broadcast
    /// clientIds of a consumer, open Consume streams.
    LimitReached,
}

impl ErrorKind {
    /// The status this kind answers in the seed's envelope (`status` of REST answers and of
    /// gRPC batch items).
    pub fn status(self) -> i32 {
        match self {
            Self::InvalidArgument | Self::NotFound => 400,
            Self::Internal | Self::Unavailable => 500,
            Self::OutcomeUnknown => 300,
            Self::Unauthenticated => 401,
            Self::PermissionDenied => 403,
            Self::StorageFull => 507,
            Self::Overloaded => 503,
            Self::LimitReached => 429,
        }
    }

    /// [`ErrorKind::status`] as a metrics label.
    pub fn status_label(self) -> &'static str {
        match self.status() {
            400 => "400",
            300 => "300",
            401 => "401",
            403 => "403",
            507 => "507",
            503 => "503",
            429 => "429",
            _ => "500",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("producer:{0} haven't registered")]
    UnknownProducer(String),
    #[error("consumer:{0} haven't registered")]
    UnknownConsumer(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    LimitReached(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidArgument(_) => ErrorKind::InvalidArgument,
            Self::UnknownProducer(_) | Self::UnknownConsumer(_) => ErrorKind::NotFound,
            Self::Unauthenticated(_) => ErrorKind::Unauthenticated,
            Self::PermissionDenied(_) => ErrorKind::PermissionDenied,
            Self::LimitReached(_) => ErrorKind::LimitReached,
            Self::Store(StoreError::Closed) => ErrorKind::Unavailable,
            Self::Store(StoreError::Rejected(_)) => ErrorKind::InvalidArgument,
            Self::Store(StoreError::OutcomeUnknown(_)) => ErrorKind::OutcomeUnknown,
            Self::Store(StoreError::StorageFull(_)) => ErrorKind::StorageFull,
            Self::Store(StoreError::Overloaded(_)) => ErrorKind::Overloaded,
            Self::Store(_) => ErrorKind::Internal,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}
