//! The HTTP API for rooms: history paging, catch-up and publishing (`/v1/rooms/...`), and a
//! room's present users (`/v1/rooms/{room}/presence`), a user's unread counts (`/v1/unread`).

use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{header, request::Parts, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::app::AppState;
use crate::auth::Identity;
use crate::error::ApiError;
use crate::listener::BodyTimeout;
use crate::reads::ReadPermit;
use crate::store::NewMessage;
use crate::writer::CommitError;
use seqcast_protocol::{self as protocol, validate_room};

/// `limit` when none is given.
pub const DEFAULT_LIMIT: usize = 100;
/// Largest `limit` honoured; larger values are clamped.
pub const MAX_LIMIT: usize = 1000;
/// Longest `from` a server-key publisher may name, in bytes.
const MAX_FROM_BYTES: usize = 256;
/// Rooms in one `GET /v1/unread` answer, and its `limit` when none is given: every room of any
/// real user in one answer, while a user with more (a bot, a hostile client marking rooms in
/// bulk) pages with `after` instead of making the node hold them all at once.
pub const MAX_UNREAD_ROOMS: usize = 10_000;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/rooms/{room}", get(room_info))
        .route(
            "/v1/rooms/{room}/messages",
            get(list_messages).post(post_message),
        )
        .route("/v1/rooms/{room}/presence", get(room_presence))
        .route("/v1/unread", get(unread))
}

/// The authenticated caller of an HTTP request (`Authorization: Bearer <JWT or server key>`).
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = bearer_token(&parts.headers);
        Ok(Caller(state.auth.http(token)?))
    }
}

/// The token of an `Authorization: Bearer ...` header, if any.
pub fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn checked_room(room: &str) -> Result<(), ApiError> {
    validate_room(room).map_err(ApiError::bad_request)
}

fn readable(caller: &Identity, room: &str) -> Result<(), ApiError> {
    checked_room(room)?;
    if !caller.can_read(room) {
        return Err(ApiError::forbidden(format!(
            "not allowed to read room {room:?}"
        )));
    }
    Ok(())
}

/// One of the caller's read slots (`reads`), held until the response is built; past the
/// limit the read is refused at once ([`ReadsRefused`]).
fn read_slot(state: &AppState, caller: &Identity) -> Result<Option<ReadPermit>, ReadsRefused> {
    if caller.is_server() {
        return Ok(None);
    }
    match state.user_reads.try_acquire(&caller.user) {
        Some(permit) => Ok(Some(permit)),
        None => Err(ReadsRefused(state.config.user_read_concurrency)),
    }
}

/// A read past `SEQCAST_USER_READ_CONCURRENCY`: 429 with `Retry-After: 1`.
struct ReadsRefused(usize);

impl IntoResponse for ReadsRefused {
    fn into_response(self) -> Response {
        let message = format!(
            "at most {} reads per user at once; retry when one is done",
            self.0
        );
        crate::error::too_many_requests(message, 1)
    }
}

async fn room_info(
    State(state): State<AppState>,
    Caller(caller): Caller,
    room: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(room) = room?;
    readable(&caller, &room)?;
    let _slot = match read_slot(&state, &caller) {
        Ok(slot) => slot,
        Err(refused) => return Ok(refused.into_response()),
    };
    let info = state.store.room_info(&room).await?;
    let body = serde_json::json!({ "room": room, "head": info.head, "first": info.first });
    Ok(Json(body).into_response())
}

/// `GET /v1/rooms/{room}/presence`: the users present (`users`), or, in a room with more than
/// `SEQCAST_PRESENCE_MAX_USERS`, only how many (`count`, no `users`).
async fn room_presence(
    State(state): State<AppState>,
    Caller(caller): Caller,
    room: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let Path(room) = room?;
    readable(&caller, &room)?;
    let _slot = match read_slot(&state, &caller) {
        Ok(slot) => slot,
        Err(refused) => return Ok(refused.into_response()),
    };
    let body = match state.presence.present(&room).await? {
        protocol::Present::Users(users) => {
            let users: Vec<&str> = users.iter().map(|u| &**u).collect();
            serde_json::json!({ "room": room, "users": users, "count": users.len() })
        }
        protocol::Present::Count(n) => serde_json::json!({ "room": room, "count": n }),
    };
    Ok(Json(body).into_response())
}

/// `GET /v1/unread`: the rooms where the caller has a read cursor, with each head, the cursor
/// and their difference. A user's own list: the server key (no user) is refused. Rooms the
/// caller's token no longer allows to read are left out (their heads are not the caller's to
/// see).
///
/// Extension: paged by room name. At most `limit` rooms (default and largest
/// [`MAX_UNREAD_ROOMS`]) after the room `after`; `has_more` says whether there are more, and
/// `next` is the `after` of the next page (the last room looked at, which may be one left out).
async fn unread(
    State(state): State<AppState>,
    Caller(caller): Caller,
    params: Result<Query<UnreadParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    if caller.is_server() {
        return Err(ApiError::forbidden(
            "read cursors are a user's: call with a user token",
        ));
    }
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page_limit(params.limit, MAX_UNREAD_ROOMS, MAX_UNREAD_ROOMS)?;
    // A room name (what `next` gives), so nothing else reaches the database: "after=%00"
    // would be a Postgres encoding error.
    let after = params.after.unwrap_or_default();
    if !after.is_empty() {
        validate_room(&after).map_err(|e| ApiError::bad_request(format!("after: {e}")))?;
    }
    let _slot = match read_slot(&state, &caller) {
        Ok(slot) => slot,
        Err(refused) => return Ok(refused.into_response()),
    };
    // One more than the page: whether there are more is known without another query.
    let mut listed = state.store.unread(&caller.user, &after, limit + 1).await?;
    let has_more = listed.len() > limit;
    listed.truncate(limit);
    let next = listed.last().map(|u| u.room.clone()).filter(|_| has_more);
    let rooms: Vec<serde_json::Value> = listed
        .into_iter()
        .filter(|u| caller.can_read(&u.room))
        .map(|u| {
            serde_json::json!({
                "room": u.room,
                "head": u.head,
                "read": u.read,
                // A cursor is capped at the head when written, and heads only grow.
                "unread": u.head.saturating_sub(u.read),
            })
        })
        .collect();
    let mut body = serde_json::json!({ "rooms": rooms, "has_more": has_more });
    if let Some(next) = next {
        body["next"] = serde_json::Value::String(next);
    }
    Ok(Json(body).into_response())
}

/// A page's `limit` parameter: `default` when not given, clamped to `max`, and 0 refused.
fn page_limit(given: Option<usize>, default: usize, max: usize) -> Result<usize, ApiError> {
    match given {
        None => Ok(default),
        Some(0) => Err(ApiError::bad_request("limit must be at least 1")),
        Some(n) => Ok(n.min(max)),
    }
}

#[derive(Deserialize)]
struct UnreadParams {
    after: Option<String>,
    limit: Option<usize>,
}

#[derive(Deserialize)]
struct ListParams {
    after: Option<u64>,
    before: Option<u64>,
    limit: Option<usize>,
}

async fn list_messages(
    State(state): State<AppState>,
    Caller(caller): Caller,
    room: Result<Path<String>, PathRejection>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(room) = room?;
    readable(&caller, &room)?;
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let _slot = match read_slot(&state, &caller) {
        Ok(slot) => slot,
        Err(refused) => return Ok(refused.into_response()),
    };
    // One more than asked tells whether there is more.
    let (messages, has_more) = match (params.after, params.before) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("give `after` or `before`, not both"))
        }
        (after, None) => {
            let mut page = state
                .store
                .read_after(&room, after.unwrap_or(0), None, limit + 1)
                .await?;
            let more = page.len() > limit;
            page.truncate(limit);
            (page, more)
        }
        (None, Some(before)) => {
            let mut page = state.store.read_before(&room, before, limit + 1).await?;
            let more = page.len() > limit;
            if more {
                page.remove(0);
            }
            (page, more)
        }
    };
    // Read after the page, so the head covers every message in it.
    let head = state.store.room_info(&room).await?.head;
    let mut body = format!(r#"{{"room":"{room}","head":{head},"messages":["#);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&protocol::message_frame(m));
    }
    body.push_str(&format!(r#"],"has_more":{has_more}}}"#));
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[derive(Deserialize)]
struct PostBody<'a> {
    #[serde(borrow, default, deserialize_with = "protocol::present")]
    body: Option<&'a RawValue>,
    #[serde(default)]
    idem: Option<String>,
    #[serde(default)]
    from: Option<String>,
}

async fn post_message(
    State(state): State<AppState>,
    Caller(caller): Caller,
    room: Result<Path<String>, PathRejection>,
    body: Body,
) -> Result<Response, ApiError> {
    let Path(room) = room?;
    checked_room(&room)?;
    if !caller.can_send(&room) {
        return Err(ApiError::forbidden(format!(
            "not allowed to send to room {room:?}"
        )));
    }
    // Counted before the body is read: a refused POST costs the node next to nothing.
    if !caller.is_server() {
        if let Err(wait) = state.user_limits.acquire(&caller.user).await {
            return Ok(crate::error::rate_limited(wait));
        }
    }
    let max_body = state.config.max_message_bytes;
    let bytes = axum::body::to_bytes(body, state.config.frame_limit().unwrap_or(usize::MAX))
        .await
        .map_err(|e| match BodyTimeout::caused(&e) {
            true => ApiError::request_timeout(),
            false => ApiError::too_large(format!(
                "request body too large; the limit for `body` is {max_body} bytes"
            )),
        })?;
    let req: PostBody = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("request body must be a JSON object: {e}")))?;
    let text = req
        .body
        .ok_or_else(|| ApiError::bad_request("missing `body`"))?
        .get();
    if text.len() > max_body {
        return Err(ApiError::too_large(format!(
            "body is {} bytes; the limit is {max_body}",
            text.len()
        )));
    }
    // Stored and replayed as it came: it must be Unicode (see `has_lone_surrogate`). A lone
    // surrogate in `idem` or `from` already failed the strict parse of the request above.
    if protocol::has_lone_surrogate(text) {
        return Err(ApiError::bad_request(protocol::LONE_SURROGATE));
    }
    if req
        .idem
        .as_deref()
        .is_some_and(|k| !protocol::valid_idem(k))
    {
        return Err(ApiError::bad_request(protocol::IDEM_RULE));
    }
    // A user posts as itself; the server key names the sender (default `system`).
    let sender = match req.from {
        Some(from) if caller.is_server() => {
            // No U+0000: a Postgres `TEXT` cannot hold it.
            if from.is_empty() || from.len() > MAX_FROM_BYTES || from.contains('\0') {
                return Err(ApiError::bad_request(format!(
                    "`from` must be 1 to {MAX_FROM_BYTES} bytes without U+0000"
                )));
            }
            from
        }
        _ => caller.user.clone(),
    };
    let message = NewMessage {
        sender,
        body: text.to_string(),
        idem: req.idem,
    };
    let appended = state
        .writers
        .submit(&room, message)
        .await
        .unwrap_or(Err(CommitError::Internal))?;
    let m = &appended.message;
    let mut reply = serde_json::json!({
        "room": m.room, "seq": m.seq, "id": m.id, "ts": protocol::format_ts(m.ts_ms),
    });
    if appended.duplicate {
        reply["duplicate"] = true.into();
    }
    Ok((StatusCode::CREATED, Json(reply)).into_response())
}
