//! Client frames in, server frames out.

use chrono::{DateTime, SecondsFormat};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::StoredMessage;

/// Longest room name, in characters.
pub const MAX_ROOM_LEN: usize = 128;
/// Longest `idem`, in bytes.
pub const MAX_IDEM_BYTES: usize = 256;
/// What a valid `idem` is, for the error message of an invalid one (WebSocket and HTTP).
pub const IDEM_RULE: &str = "`idem` must be a string of 1 to 256 bytes without U+0000";

/// Error codes of `error` frames (and the `error` field of HTTP errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotJoined,
    TooLarge,
    RateLimited,
    /// A configured limit was reached: rooms per connection (the connection stays), or
    /// connections per node, user or address (at the upgrade, over HTTP).
    LimitExceeded,
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// A frame that could not be accepted, with the `ref` to answer it under.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub reply_ref: Option<Ref>,
}

/// A client's `ref`, kept as its JSON text (a number or a string) to echo back unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ref(Box<str>);

impl Ref {
    pub fn as_json(&self) -> &str {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ClientFrame {
    Join {
        room: String,
        since: Option<u64>,
        /// `"presence":true`: also receive the room's presence.
        presence: bool,
        reply_ref: Option<Ref>,
    },
    Leave {
        room: String,
        reply_ref: Option<Ref>,
    },
    Send {
        room: String,
        body: String,
        idem: Option<String>,
        reply_ref: Option<Ref>,
    },
    Ping {
        reply_ref: Option<Ref>,
    },
    /// A fresh token for the connection (`{"type":"auth","token":...}`).
    Auth {
        token: Token,
        reply_ref: Option<Ref>,
    },
    /// An ephemeral frame for the room's other sessions (typing, cursors): never stored. Its
    /// `body` is checked for Unicode like a message's, but not for size here: the signal limit
    /// (`SEQCAST_MAX_SIGNAL_BYTES`) is the server's, applied by the session.
    Signal {
        room: String,
        body: String,
        reply_ref: Option<Ref>,
    },
    /// The user has read `room` up to `seq` (a read cursor).
    Read {
        room: String,
        seq: u64,
        reply_ref: Option<Ref>,
    },
}

/// A token sent in an `auth` frame; its `Debug` output hides it, so it never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(pub String);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The fields of a client frame, as raw JSON. A field given as `null` is `Some("null")`, not
/// `None`: a `null` body is a valid body, while a missing one is not.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default, deserialize_with = "present")]
    kind: Option<&'a RawValue>,
    #[serde(rename = "ref", borrow, default, deserialize_with = "present")]
    reply_ref: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    room: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    body: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    idem: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    token: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    seq: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    presence: Option<&'a RawValue>,
}

/// Deserializes a field that is present (even as `null`) into `Some`.
pub fn present<'de, D>(d: D) -> Result<Option<&'de RawValue>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one client text frame. `max_body` is `SEQCAST_MAX_MESSAGE_BYTES`.
pub fn parse_client_frame(text: &str, max_body: usize) -> Result<ClientFrame, FrameError> {
    let env: Envelope = serde_json::from_str(text).map_err(|_| FrameError {
        code: ErrorCode::BadRequest,
        message: "frame is not a JSON object".into(),
        reply_ref: None,
    })?;
    let reply_ref = match env.reply_ref {
        None => None,
        Some(r) if r.get() == "null" => None,
        // A string `ref` is echoed as it came: it must be Unicode, or the replies would not be.
        Some(r) if r.get().starts_with('"') && has_lone_surrogate(r.get()) => {
            return Err(bad(None, LONE_SURROGATE))
        }
        Some(r)
            if r.get().starts_with('"')
                || r.get()
                    .starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9']) =>
        {
            Some(Ref(r.get().into()))
        }
        Some(_) => return Err(bad(None, "`ref` must be a number or a string")),
    };
    let bad_here = |msg: &str| bad(reply_ref.clone(), msg);
    let kind: String =
        required_str(env.kind).ok_or_else(|| bad_here("missing or invalid `type`"))?;
    match kind.as_str() {
        "join" => {
            let room = room_field(env.room).map_err(|m| bad_here(&m))?;
            let since = match env.since {
                None => None,
                Some(r) if r.get() == "null" => None,
                Some(r) => Some(
                    serde_json::from_str::<u64>(r.get())
                        .map_err(|_| bad_here("`since` must be a non-negative integer"))?,
                ),
            };
            let presence = match env.presence.map(RawValue::get) {
                None | Some("null") | Some("false") => false,
                Some("true") => true,
                Some(_) => return Err(bad_here("`presence` must be a boolean")),
            };
            Ok(ClientFrame::Join {
                room,
                since,
                presence,
                reply_ref,
            })
        }
        "leave" => {
            let room = room_field(env.room).map_err(|m| bad_here(&m))?;
            Ok(ClientFrame::Leave { room, reply_ref })
        }
        "send" => {
            let room = room_field(env.room).map_err(|m| bad_here(&m))?;
            let body = env.body.ok_or_else(|| bad_here("missing `body`"))?.get();
            if body.len() > max_body {
                return Err(FrameError {
                    code: ErrorCode::TooLarge,
                    message: format!("body is {} bytes; the limit is {max_body}", body.len()),
                    reply_ref,
                });
            }
            // The body is stored and replayed as it came, so it must be text every client can
            // parse (and the database can store).
            if has_lone_surrogate(body) {
                return Err(bad_here(LONE_SURROGATE));
            }
            // (A lone surrogate in `idem` fails the strict string parse here.)
            let idem = match env.idem {
                None => None,
                Some(r) if r.get() == "null" => None,
                Some(r) => Some(
                    serde_json::from_str::<String>(r.get())
                        .ok()
                        .filter(|s| valid_idem(s))
                        .ok_or_else(|| bad_here(IDEM_RULE))?,
                ),
            };
            Ok(ClientFrame::Send {
                room,
                body: body.to_string(),
                idem,
                reply_ref,
            })
        }
        "signal" => {
            let room = room_field(env.room).map_err(|m| bad_here(&m))?;
            let body = env.body.ok_or_else(|| bad_here("missing `body`"))?.get();
            // Relayed as it came, like a message body: it must be text every client can parse.
            if has_lone_surrogate(body) {
                return Err(bad_here(LONE_SURROGATE));
            }
            Ok(ClientFrame::Signal {
                room,
                body: body.to_string(),
                reply_ref,
            })
        }
        "read" => {
            let room = room_field(env.room).map_err(|m| bad_here(&m))?;
            let seq = env
                .seq
                .and_then(|r| serde_json::from_str::<u64>(r.get()).ok())
                .ok_or_else(|| bad_here("`seq` must be a non-negative integer"))?;
            Ok(ClientFrame::Read {
                room,
                seq,
                reply_ref,
            })
        }
        "ping" => Ok(ClientFrame::Ping { reply_ref }),
        "auth" => {
            let token = required_str(env.token)
                .ok_or_else(|| bad_here("missing or invalid `token` (a string)"))?;
            Ok(ClientFrame::Auth {
                token: Token(token),
                reply_ref,
            })
        }
        other => Err(bad_here(&format!("unknown frame type {other:?}"))),
    }
}

/// The refusal of text with a lone surrogate escape.
pub const LONE_SURROGATE: &str =
    "lone UTF-16 surrogate escape (\\uD800 to \\uDFFF not in a pair): not valid Unicode";

/// An `idem` the stores can keep: 1 to [`MAX_IDEM_BYTES`] bytes, and no U+0000, which a
/// Postgres `TEXT` cannot hold (the commit of the whole group it is in would fail).
pub fn valid_idem(idem: &str) -> bool {
    !idem.is_empty() && idem.len() <= MAX_IDEM_BYTES && !idem.contains('\0')
}

/// True if the JSON text `json` has a `\u` escape of a UTF-16 surrogate (U+D800 to U+DFFF)
/// that is not a high one followed by a low one. Such text is valid JSON grammar, and
/// serde_json's `RawValue` keeps it, but it is not Unicode: strict parsers (serde_json into a
/// `String`, for one) refuse it, so a stored body with one could never be read back.
///
/// A scan of the escapes only, no allocation: text without a backslash costs one `memchr`.
/// `json` must be valid JSON (escapes only occur in strings, and are complete).
pub fn has_lone_surrogate(json: &str) -> bool {
    let mut rest = json.as_bytes();
    while let Some(at) = rest.iter().position(|&b| b == b'\\') {
        let escape = &rest[at..];
        if escape.get(1) != Some(&b'u') {
            // `\\`, `\"`, `\n`...: two bytes, whatever the second is.
            rest = escape.get(2..).unwrap_or_default();
            continue;
        }
        match hex4(&escape[2..]) {
            Some(0xD800..=0xDBFF) => {
                let low = escape.get(6..8) == Some(b"\\u".as_slice())
                    && matches!(hex4(&escape[8..]), Some(0xDC00..=0xDFFF));
                if !low {
                    return true;
                }
                rest = &escape[12..];
            }
            Some(0xDC00..=0xDFFF) => return true,
            _ => rest = escape.get(6..).unwrap_or_default(),
        }
    }
    false
}

/// The four hex digits at the start of `digits`, if there are four.
fn hex4(digits: &[u8]) -> Option<u16> {
    digits.get(..4)?.iter().try_fold(0u16, |acc, &d| {
        let v = char::from(d).to_digit(16)?;
        Some(acc << 4 | v as u16)
    })
}

fn bad(reply_ref: Option<Ref>, message: &str) -> FrameError {
    FrameError {
        code: ErrorCode::BadRequest,
        message: message.into(),
        reply_ref,
    }
}

fn required_str(raw: Option<&RawValue>) -> Option<String> {
    raw.and_then(|r| serde_json::from_str::<String>(r.get()).ok())
}

fn room_field(raw: Option<&RawValue>) -> Result<String, String> {
    let room = required_str(raw).ok_or("missing or invalid `room`")?;
    validate_room(&room)?;
    Ok(room)
}

/// Room names: 1 to 128 characters of `A-Z a-z 0-9 _ . : -`.
pub fn validate_room(room: &str) -> Result<(), String> {
    if room.is_empty() || room.len() > MAX_ROOM_LEN {
        return Err(format!("room name must be 1 to {MAX_ROOM_LEN} characters"));
    }
    if !room
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
    {
        return Err("room name may only contain A-Z a-z 0-9 _ . : -".into());
    }
    Ok(())
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-23T04:16:26.123Z`.
pub fn format_ts(ts_ms: i64) -> String {
    DateTime::from_timestamp_millis(ts_ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Serializes a committed message as its `message` frame. Written by hand: the body is already
/// JSON text and is spliced in as is, and this runs once per message (the bytes are then shared
/// by every subscriber).
pub fn message_frame(m: &StoredMessage) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(128 + m.room.len() + m.sender.len() + m.body.len());
    s.push_str(r#"{"type":"message","room":"#);
    // Escaped like the sender: rooms sent by clients are validated, but a row can also come from
    // a backend's own SQL insert, and one bad name must not make a frame no client can parse.
    push_json_string(&mut s, &m.room);
    // Writing to a String cannot fail.
    let _ = write!(
        s,
        r#","seq":{},"id":"{}","from":"#,
        m.seq,
        m.id.hyphenated()
    );
    push_json_string(&mut s, &m.sender);
    s.push_str(r#","body":"#);
    s.push_str(&m.body);
    s.push_str(r#","ts":""#);
    s.push_str(&format_ts(m.ts_ms));
    s.push_str(r#""}"#);
    s
}

/// Appends `value` as a JSON string, escaped exactly as serde_json escapes it (control
/// characters, `"` and `\`); a user id almost never needs it, so that case is copied as is.
fn push_json_string(out: &mut String, value: &str) {
    if value.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(&serde_json::Value::from(value).to_string());
    } else {
        out.push('"');
        out.push_str(value);
        out.push('"');
    }
}

fn json_string(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    push_json_string(&mut out, value);
    out
}

fn with_ref(mut obj: String, reply_ref: Option<&Ref>) -> String {
    if let Some(r) = reply_ref {
        obj.pop(); // the closing brace
        obj.push_str(r#","ref":"#);
        obj.push_str(r.as_json());
        obj.push('}');
    }
    obj
}

/// Who is present in a room, as a `joined` (with `"presence":true`) or a `presence` frame tells
/// it: the users, or only their number in a room with more present users than the node lists
/// (`SEQCAST_PRESENCE_MAX_USERS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Present<S> {
    Users(Vec<S>),
    Count(u64),
}

/// The fields of a `joined` frame.
#[derive(Debug, Default)]
pub struct Joined<'a, S> {
    pub head: u64,
    pub first: u64,
    pub truncated: bool,
    /// The user's read cursor in the room (`Some(0)` when it has none); `None` leaves the field
    /// out (the `joined` a catch-up sends when retention cut its replay short).
    pub read: Option<u64>,
    /// Asked with `"presence":true`: `presence` (the users) or `presence_count`.
    pub presence: Option<&'a Present<S>>,
}

/// See [`Joined`] for the fields.
pub fn joined_frame(
    room: &str,
    head: u64,
    first: u64,
    truncated: bool,
    read: Option<u64>,
    r: Option<&Ref>,
) -> String {
    joined_frame_with(
        room,
        &Joined::<&str> {
            head,
            first,
            truncated,
            read,
            presence: None,
        },
        r,
    )
}

pub fn joined_frame_with<S: AsRef<str>>(room: &str, j: &Joined<'_, S>, r: Option<&Ref>) -> String {
    use std::fmt::Write as _;
    let (head, first) = (j.head, j.first);
    let mut s = format!(r#"{{"type":"joined","room":"{room}","head":{head},"first":{first}"#);
    if j.truncated {
        s.push_str(r#","truncated":true"#);
    }
    // Writing to a String cannot fail.
    if let Some(read) = j.read {
        let _ = write!(s, r#","read":{read}"#);
    }
    match j.presence {
        None => {}
        Some(Present::Users(users)) => {
            s.push_str(r#","presence":"#);
            push_json_list(&mut s, users);
        }
        Some(Present::Count(n)) => {
            let _ = write!(s, r#","presence_count":{n}"#);
        }
    }
    s.push('}');
    with_ref(s, r)
}

/// A `presence` frame: users who arrived or left since the last one (either list may be empty,
/// and is then left out).
pub fn presence_frame<S: AsRef<str>>(room: &str, joined: &[S], left: &[S]) -> String {
    let mut s = String::with_capacity(48 + room.len());
    s.push_str(r#"{"type":"presence","room":"#);
    push_json_string(&mut s, room);
    if !joined.is_empty() {
        s.push_str(r#","joined":"#);
        push_json_list(&mut s, joined);
    }
    if !left.is_empty() {
        s.push_str(r#","left":"#);
        push_json_list(&mut s, left);
    }
    s.push('}');
    s
}

/// A `presence` frame that replaces what a client knows: the full list (`users`, sent when a
/// large room becomes small enough to list again) or only the count (`count`, while it is too
/// large to list).
pub fn presence_reset_frame<S: AsRef<str>>(room: &str, present: &Present<S>) -> String {
    let mut s = String::with_capacity(48 + room.len());
    s.push_str(r#"{"type":"presence","room":"#);
    push_json_string(&mut s, room);
    match present {
        Present::Users(users) => {
            s.push_str(r#","users":"#);
            push_json_list(&mut s, users);
        }
        Present::Count(n) => {
            use std::fmt::Write as _;
            let _ = write!(s, r#","count":{n}"#);
        }
    }
    s.push('}');
    s
}

fn push_json_list<S: AsRef<str>>(s: &mut String, items: &[S]) {
    s.push('[');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        push_json_string(s, item.as_ref());
    }
    s.push(']');
}

/// A signal as the room's other sessions receive it. Serialized once per signal (the bytes are
/// shared by every recipient, on every node); `body` is spliced in as the client sent it.
pub fn signal_frame(room: &str, from: &str, body: &str) -> String {
    let mut s = String::with_capacity(48 + room.len() + from.len() + body.len());
    s.push_str(r#"{"type":"signal","room":"#);
    push_json_string(&mut s, room);
    s.push_str(r#","from":"#);
    push_json_string(&mut s, from);
    s.push_str(r#","body":"#);
    s.push_str(body);
    s.push('}');
    s
}

/// A read cursor: the reply to a `read` (with its `ref`), and, without one, what the user's
/// other connections receive.
pub fn read_frame(room: &str, seq: u64, r: Option<&Ref>) -> String {
    with_ref(
        format!(
            r#"{{"type":"read","room":{},"seq":{seq}}}"#,
            json_string(room)
        ),
        r,
    )
}

pub fn left_frame(room: &str, r: Option<&Ref>) -> String {
    with_ref(format!(r#"{{"type":"left","room":"{room}"}}"#), r)
}

/// A `left` the client did not ask for, e.g. `"reason":"forbidden"` when a refreshed token no
/// longer allows the room. `reason` is a fixed code that needs no escaping.
pub fn left_reason_frame(room: &str, reason: &str) -> String {
    format!(r#"{{"type":"left","room":"{room}","reason":"{reason}"}}"#)
}

/// The reply to an `auth` frame: the new token's expiry, absent for a connection that does not
/// expire (development mode, the server key).
pub fn authed_frame(exp: Option<u64>, r: Option<&Ref>) -> String {
    let obj = match exp {
        Some(exp) => format!(r#"{{"type":"authed","exp":{exp}}}"#),
        None => r#"{"type":"authed"}"#.to_string(),
    };
    with_ref(obj, r)
}

pub fn ack_frame(m: &StoredMessage, r: Option<&Ref>) -> String {
    let obj = format!(
        r#"{{"type":"ack","room":"{}","seq":{},"id":"{}","ts":"{}"}}"#,
        m.room,
        m.seq,
        m.id,
        format_ts(m.ts_ms)
    );
    with_ref(obj, r)
}

pub fn pong_frame(r: Option<&Ref>) -> String {
    with_ref(r#"{"type":"pong"}"#.to_string(), r)
}

pub fn error_frame(code: ErrorCode, message: &str, r: Option<&Ref>) -> String {
    let obj = format!(
        r#"{{"type":"error","code":"{}","message":{}}}"#,
        code.as_str(),
        json_string(message)
    );
    with_ref(obj, r)
}

#[cfg(test)]
#[path = "frames_tests.rs"]
mod tests;
