//! The engine's one error vocabulary and its one table: each [`ErrorKind`] has one row of
//! [`ErrorKind::code`] giving the seed envelope's `status`, the HTTP status when statuses are
//! mirrored, the gRPC code and how loudly it is logged. Adapters convert a row's numbers to
//! their own types and decide nothing themselves.

use mqproxy_store::StoreError;

/// What kind of failure (the rows of the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is wrong.
    InvalidArgument,
    /// A producer or consumer name the proxy does not know.
    NotFound,
    /// The server failed.
    Internal,
    /// The server is shutting down, its store is closed, or a backend did not answer in time.
    Unavailable,
    /// A send timed out after it may have been stored: retry if every message must arrive.
    OutcomeUnknown,
    /// A token is required and none was presented.
    Unauthenticated,
    /// The token presented is not the entry's.
    PermissionDenied,
    /// The store's disk is full; nothing was stored.
    StorageFull,
    /// Too many writes waiting; nothing was stored, retry shortly (REST adds `Retry-After`).
    Overloaded,
    /// A bound on what clients may create is reached: broadcast clientIds of a consumer, open
    /// Consume streams.
    LimitReached,
}

/// The gRPC status codes the table uses (numbered as gRPC numbers them), so the engine needs
/// no gRPC crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum GrpcCode {
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    Internal = 13,
    Unavailable = 14,
    Unauthenticated = 16,
}

/// How loudly a failure is logged where it is answered: what an operator must look at is an
/// error; what a client can cause at will (and repeat by the thousand) stays at debug.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Warn,
    Error,
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode {
    /// The seed envelope's `status` (REST answers, gRPC batch items).
    pub envelope_status: i32,
    /// Its text, the `status` label of the metrics.
    pub status_label: &'static str,
    /// The HTTP status when the envelope's is mirrored (300 "outcome unknown" is not HTTP's
    /// Multiple Choices: a gateway timed out).
    pub http_status: u16,
    pub grpc: GrpcCode,
    pub log: LogLevel,
}

impl ErrorKind {
    /// Every kind, for the adapters' reverse lookups and the table's tests.
    pub const ALL: [Self; 10] = [
        Self::InvalidArgument,
        Self::NotFound,
        Self::Internal,
        Self::Unavailable,
        Self::OutcomeUnknown,
        Self::Unauthenticated,
        Self::PermissionDenied,
        Self::StorageFull,
        Self::Overloaded,
        Self::LimitReached,
    ];

    /// The table.
    pub const fn code(self) -> ErrorCode {
        const fn row(
            envelope_status: i32,
            status_label: &'static str,
            http_status: u16,
            grpc: GrpcCode,
            log: LogLevel,
        ) -> ErrorCode {
            ErrorCode {
                envelope_status,
                status_label,
                http_status,
                grpc,
                log,
            }
        }
        use GrpcCode as G;
        use LogLevel as L;
        match self {
            Self::InvalidArgument => row(400, "400", 400, G::InvalidArgument, L::Debug),
            Self::NotFound => row(400, "400", 400, G::NotFound, L::Debug),
            Self::Internal => row(500, "500", 500, G::Internal, L::Error),
            Self::Unavailable => row(500, "500", 500, G::Unavailable, L::Warn),
            Self::OutcomeUnknown => row(300, "300", 504, G::DeadlineExceeded, L::Error),
            Self::Unauthenticated => row(401, "401", 401, G::Unauthenticated, L::Debug),
            Self::PermissionDenied => row(403, "403", 403, G::PermissionDenied, L::Debug),
            Self::StorageFull => row(507, "507", 507, G::ResourceExhausted, L::Error),
            Self::Overloaded => row(503, "503", 503, G::Unavailable, L::Debug),
            Self::LimitReached => row(429, "429", 429, G::ResourceExhausted, L::Debug),
        }
    }

    /// The seed envelope's `status` of this kind.
    pub const fn status(self) -> i32 {
        self.code().envelope_status
    }

    /// [`ErrorKind::status`] as a metrics label.
    pub const fn status_label(self) -> &'static str {
        self.code().status_label
    }
}

/// The HTTP status of an envelope `status` when statuses are mirrored: the table's for an
/// error status, the number itself otherwise (200), 500 for a number HTTP has not.
pub fn http_status_of_envelope(status: i32) -> u16 {
    ErrorKind::ALL
        .iter()
        .map(|k| k.code())
        .find(|c| c.envelope_status == status)
        .map(|c| c.http_status)
        .or_else(|| u16::try_from(status).ok().filter(|s| (200..600).contains(s)))
        .unwrap_or(500)
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
    /// A backend did not answer within the time the request allowed (`pullTimeout`).
    #[error("{0}")]
    Unavailable(String),
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
            Self::Unavailable(_) | Self::Store(StoreError::Closed) => ErrorKind::Unavailable,
            Self::Store(StoreError::Rejected(_)) => ErrorKind::InvalidArgument,
            Self::Store(StoreError::OutcomeUnknown(_)) => ErrorKind::OutcomeUnknown,
            Self::Store(StoreError::StorageFull(_)) => ErrorKind::StorageFull,
            Self::Store(StoreError::Overloaded(_)) => ErrorKind::Overloaded,
            Self::Store(_) => ErrorKind::Internal,
        }
    }

    /// This error's row of the table.
    pub fn code(&self) -> ErrorCode {
        self.kind().code()
    }

    /// Logs the failure of a request at its row's level: `protocol` is "http" or "grpc",
    /// `operation` what was asked (the same words as the request metrics).
    pub fn log_answered(&self, protocol: &str, operation: &str) {
        match self.code().log {
            LogLevel::Error => {
                tracing::error!(protocol, operation, kind = ?self.kind(), error = %self, "request failed")
            }
            LogLevel::Warn => tracing::warn!(protocol, operation, kind = ?self.kind(), error = %self, "request failed"),
            LogLevel::Debug => {
                tracing::debug!(protocol, operation, kind = ?self.kind(), error = %self, "request refused")
            }
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_is_consistent() {
        for kind in ErrorKind::ALL {
            let c = kind.code();
            assert_eq!(c.status_label, c.envelope_status.to_string(), "{kind:?}");
            assert!((300..600).contains(&c.http_status), "{kind:?}");
            assert_eq!(http_status_of_envelope(c.envelope_status), c.http_status, "{kind:?}");
            // Failures of the server are never quieter than a warning.
            if matches!(
                kind,
                ErrorKind::Internal | ErrorKind::StorageFull | ErrorKind::OutcomeUnknown
            ) {
                assert_eq!(c.log, LogLevel::Error, "{kind:?}");
            }
        }
        assert_eq!(http_status_of_envelope(200), 200);
        assert_eq!(http_status_of_envelope(300), 504);
        assert_eq!(http_status_of_envelope(7), 500);
    }

    #[test]
    fn store_failures_keep_their_kind() {
        assert_eq!(EngineError::from(StoreError::Closed).kind(), ErrorKind::Unavailable);
        assert_eq!(
            EngineError::from(StoreError::StorageFull("disk".into())).kind(),
            ErrorKind::StorageFull
        );
        assert_eq!(
            EngineError::from(StoreError::Backend("broker".into())).kind(),
            ErrorKind::Internal
        );
    }
}
