//! The HTTP error boundary: every handler error becomes `{"error": code, "message": text}` with
//! its status here, in one place. Internal details are logged, never sent to the client.
//!
//! axum's own refusals (a path parameter that does not decode, a method a route does not serve,
//! a request to `/v1/ws` that is no WebSocket handshake) are plain text; they are turned into
//! this JSON too, keeping axum's status (and, for 405, its `Allow` header).

use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::AuthError;
use crate::store::StoreError;
use crate::writer::CommitError;
use seqcast_protocol::ErrorCode;

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code: code.as_str(),
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge, message)
    }

    pub fn not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "not_found",
            message: "no such endpoint".into(),
        }
    }

    /// The route exists but not for this method (405). The router adds the `Allow` header.
    pub fn method_not_allowed() -> ApiError {
        ApiError {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: "method_not_allowed",
            message: "method not allowed on this path; see the Allow header".into(),
        }
    }

    /// The request body did not arrive within `SEQCAST_HANDSHAKE_TIMEOUT` (408).
    pub fn request_timeout() -> ApiError {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "request_timeout",
            message: "the request body did not arrive within SEQCAST_HANDSHAKE_TIMEOUT".into(),
        }
    }

    /// One of axum's own refusals, with its status: 405 is `method_not_allowed`, anything else
    /// the client's malformed request (`bad_request`).
    pub fn rejected(status: StatusCode, message: impl Into<String>) -> ApiError {
        let code = match status {
            StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
            _ => ErrorCode::BadRequest.as_str(),
        };
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    /// A connection limit refused the request (`limit_exceeded`: 429, or 503 for the node's
    /// own limit).
    pub fn limit_exceeded(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError::new(status, ErrorCode::LimitExceeded, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            message,
        )
    }

    fn internal() -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            "internal error",
        )
    }
}

/// The answer to an HTTP request past its user's rate (`SEQCAST_USER_SEND_RATE`): 429
/// `rate_limited`, with `Retry-After` in whole seconds (rounded up, at least 1) and the wait in
/// milliseconds in the message, as on the WebSocket.
pub fn rate_limited(wait: Duration) -> Response {
    let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    too_many_requests(crate::ratelimit::user::user_refusal(wait), seconds.max(1))
}

/// 429 `rate_limited` with `message` and `Retry-After: retry_after` (seconds): the one shape of
/// every HTTP refusal for going too fast (the user send rate, the user's reads in flight).
pub fn too_many_requests(message: impl Into<String>, retry_after: u64) -> Response {
    let mut response = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::RateLimited,
        message,
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": self.code, "message": self.message });
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::REQUEST_TIMEOUT {
            // The rest of the body may still be on its way: the connection cannot carry another
            // request.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> ApiError {
        // Any path that routed but whose parameter does not decode (invalid percent-encoding
        // or UTF-8) is the client's malformed request.
        ApiError::bad_request(e.body_text())
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            e.to_string(),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(_) => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::unavailable("the database is unavailable; retry")
            }
            _ => {
                tracing::error!(error = %e, "store error");
                ApiError::internal()
            }
        }
    }
}

impl From<CommitError> for ApiError {
    fn from(e: CommitError) -> ApiError {
        match e {
            CommitError::Unavailable => ApiError::unavailable(e.to_string()),
            CommitError::Internal => ApiError::internal(),
        }
    }
}
