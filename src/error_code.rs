//! The `code` of every JSON error cachegate answers with (`{"error":
//! {"status": …, "code": "…", "message": "…"}}`, built by
//! [`crate::proxy::json_error`]). A leaf: the proxy, the upstream client,
//! the canonical request and the adapters all name their failures here,
//! and the wire string is written once, in [`ErrorCode::as_str`].

/// What went wrong, as the client reads it in the error body (and, for
/// an upstream failure, in `Cache-Status`'s `detail`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The request's method is not one this endpoint serves (`CONNECT`,
    /// a purge that is not a POST).
    MethodNotAllowed,
    /// A path origins read differently from RFC 3986 (`..;x`, `..%2F`).
    AmbiguousPath,
    /// The request target is longer than `serve.max_uri_bytes`.
    UriTooLong,
    /// The request body is larger than `serve.max_request_bytes`.
    RequestTooLarge,
    /// The request body did not arrive within `serve.body_read_timeout`.
    RequestBodyTimeout,
    /// The client's `If-Match` / `If-Unmodified-Since` does not hold.
    PreconditionFailed,
    /// An endpoint that does not exist (or a purge without the token).
    NotFound,
    /// The purge request does not parse or names nothing valid.
    BadPurgeRequest,
    /// The purge reached the backend, but CloudFront refused it.
    EdgeInvalidationFailed,
    /// The backend failed while purging.
    PurgeFailed,
    /// `upstream.timeout` ran out.
    UpstreamTimeout,
    /// No connection to the upstream.
    UpstreamUnreachable,
    /// The upstream's body is larger than `upstream.max_response_bytes`.
    UpstreamResponseTooLarge,
    /// Any other broken exchange with the upstream.
    UpstreamError,
    /// The upstream breaker is open.
    UpstreamOpen,
    /// The upstream asked to be left alone (`Retry-After`).
    UpstreamRetryAfter,
    /// The upstream request budget is spent.
    UpstreamBudget,
    /// A response Lambda cannot carry back.
    ResponseTooLargeForLambda,
}

impl ErrorCode {
    /// The wire string: stable, clients match on it.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::AmbiguousPath => "ambiguous_path",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::RequestTooLarge => "request_too_large",
            ErrorCode::RequestBodyTimeout => "request_body_timeout",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::NotFound => "not_found",
            ErrorCode::BadPurgeRequest => "bad_purge_request",
            ErrorCode::EdgeInvalidationFailed => "edge_invalidation_failed",
            ErrorCode::PurgeFailed => "purge_failed",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::UpstreamResponseTooLarge => "upstream_response_too_large",
            ErrorCode::UpstreamError => "upstream_error",
            ErrorCode::UpstreamOpen => "upstream_open",
            ErrorCode::UpstreamRetryAfter => "upstream_retry_after",
            ErrorCode::UpstreamBudget => "upstream_budget",
            ErrorCode::ResponseTooLargeForLambda => "response_too_large_for_lambda",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
