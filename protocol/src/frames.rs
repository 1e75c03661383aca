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
            Ok(ClientFrame::Join {
                room,
                since,
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

/// `read`: the user's read cursor in the room (`Some(0)` when it has none); `None` leaves the
/// field out (the `joined` a catch-up sends when retention cut its replay short).
pub fn joined_frame(
    room: &str,
    head: u64,
    first: u64,
    truncated: bool,
    read: Option<u64>,
    r: Option<&Ref>,
) -> String {
    use std::fmt::Write as _;
    let mut s = format!(r#"{{"type":"joined","room":"{room}","head":{head},"first":{first}"#);
    if truncated {
        s.push_str(r#","truncated":true"#);
    }
    if let Some(read) = read {
        // Writing to a String cannot fail.
        let _ = write!(s, r#","read":{read}"#);
    }
    s.push('}');
    with_ref(s, r)
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
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse(s: &str) -> Result<ClientFrame, FrameError> {
        parse_client_frame(s, 64)
    }

    #[test]
    fn strings_are_escaped_exactly_as_serde_json_does() {
        for s in [
            "alice",
            "",
            "a\"b",
            "back\\slash",
            "tab\tnew\nline",
            "\u{0}\u{1f}",
            "\u{7f}",
            "caf\u{e9} \u{1f600}",
            "</script>",
        ] {
            assert_eq!(json_string(s), serde_json::to_string(s).unwrap(), "{s:?}");
        }
    }

    #[test]
    fn frames_parse() {
        assert_eq!(
            parse(r#"{"type":"join","room":"general","since":41,"ref":1}"#).unwrap(),
            ClientFrame::Join {
                room: "general".into(),
                since: Some(41),
                reply_ref: Some(Ref("1".into()))
            }
        );
        match parse(r#"{"type":"send","room":"a","body":{"x": [1, 2]},"idem":"k","ref":"r"}"#)
            .unwrap()
        {
            ClientFrame::Send {
                body,
                idem,
                reply_ref,
                ..
            } => {
                assert_eq!(body, r#"{"x": [1, 2]}"#, "body kept byte for byte");
                assert_eq!(idem.as_deref(), Some("k"));
                assert_eq!(reply_ref.unwrap().as_json(), r#""r""#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn null_is_a_body() {
        match parse(r#"{"type":"send","room":"a","body":null}"#).unwrap() {
            ClientFrame::Send { body, .. } => assert_eq!(body, "null"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_frames_keep_their_ref() {
        let e = parse(r#"{"type":"join","room":"bad room","ref":7}"#).unwrap_err();
        assert_eq!(
            (e.code, e.reply_ref.unwrap().as_json()),
            (ErrorCode::BadRequest, "7")
        );
        let e = parse(r#"{"type":"send","room":"a","body":"0123456789012345678901234567890123456789012345678901234567890123","ref":"x"}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        for bad in [
            "nope",
            "[1]",
            r#"{"type":"dance"}"#,
            r#"{"room":"a"}"#,
            r#"{"type":"send","room":"a"}"#,
            r#"{"type":"send","room":null,"body":1}"#,
            r#"{"type":"join"}"#,
            r#"{"type":"join","room":""}"#,
            r#"{"type":"join","room":"a","since":-1}"#,
            r#"{"type":"ping","ref":{"a":1}}"#,
            r#"{"type":"auth"}"#,
            r#"{"type":"auth","token":42}"#,
        ] {
            assert_eq!(parse(bad).unwrap_err().code, ErrorCode::BadRequest, "{bad}");
        }
        assert!(validate_room(&"x".repeat(128)).is_ok());
        assert!(validate_room(&"x".repeat(129)).is_err());
        assert!(validate_room("A-z_0.9:-").is_ok());
        assert!(validate_room("é").is_err());
    }

    #[test]
    fn frames_are_valid_json() {
        let m = StoredMessage {
            room: "general".into(),
            seq: 58,
            id: uuid::Uuid::nil(),
            sender: "al\"ice".into(),
            body: r#"{"t":"hi"}"#.into(),
            ts_ms: 1_700_000_000_123,
        };
        let v: Value = serde_json::from_str(&message_frame(&m)).unwrap();
        assert_eq!(
            v,
            json!({"type":"message","room":"general","seq":58,"id":uuid::Uuid::nil(),"from":"al\"ice","body":{"t":"hi"},"ts":"2023-11-14T22:13:20.123Z"})
        );
        // A room that did not come through `validate_room` (a backend's own SQL insert) is
        // still written as a JSON string clients can parse.
        let odd = StoredMessage {
            room: "q\"\\\n".into(),
            ..m.clone()
        };
        let v: Value = serde_json::from_str(&message_frame(&odd)).unwrap();
        assert_eq!(v["room"], "q\"\\\n");
        let r = Ref(r#""a""#.into());
        let v: Value = serde_json::from_str(&ack_frame(&m, Some(&r))).unwrap();
        assert_eq!(v["ref"], "a");
        let v: Value = serde_json::from_str(&joined_frame("g", 3, 1, true, None, None)).unwrap();
        assert_eq!(
            v,
            json!({"type":"joined","room":"g","head":3,"first":1,"truncated":true})
        );
        let v: Value =
            serde_json::from_str(&error_frame(ErrorCode::NotJoined, "x\"y", Some(&r))).unwrap();
        assert_eq!(v["code"], "not_joined");
        let v: Value =
            serde_json::from_str(&error_frame(ErrorCode::LimitExceeded, "", None)).unwrap();
        assert_eq!(v["code"], "limit_exceeded");
        let v: Value = serde_json::from_str(&left_reason_frame("g", "forbidden")).unwrap();
        assert_eq!(v, json!({"type":"left","room":"g","reason":"forbidden"}));
        let v: Value = serde_json::from_str(&authed_frame(Some(1_700_000_000), Some(&r))).unwrap();
        assert_eq!(v, json!({"type":"authed","exp":1_700_000_000,"ref":"a"}));
        let v: Value = serde_json::from_str(&authed_frame(None, None)).unwrap();
        assert_eq!(v, json!({"type":"authed"}));
    }

    #[test]
    fn signals_and_read_cursors_parse_and_are_written() {
        assert_eq!(
            parse(r#"{"type":"signal","room":"r","body":{"typing":true},"ref":5}"#).unwrap(),
            ClientFrame::Signal {
                room: "r".into(),
                body: r#"{"typing":true}"#.into(),
                reply_ref: Some(Ref("5".into()))
            }
        );
        // The message limit (64 here) is not the signal's: the session checks that one.
        let long = format!(
            r#"{{"type":"signal","room":"r","body":"{}"}}"#,
            "x".repeat(100)
        );
        assert!(matches!(parse(&long), Ok(ClientFrame::Signal { .. })));
        assert_eq!(
            parse(r#"{"type":"read","room":"r","seq":57,"ref":"x"}"#).unwrap(),
            ClientFrame::Read {
                room: "r".into(),
                seq: 57,
                reply_ref: Some(Ref(r#""x""#.into()))
            }
        );
        for bad in [
            r#"{"type":"signal","room":"r"}"#,
            r#"{"type":"signal","room":"bad room","body":1}"#,
            r#"{"type":"signal","room":"r","body":"\ud800"}"#,
            r#"{"type":"read","room":"r"}"#,
            r#"{"type":"read","room":"r","seq":-1}"#,
            r#"{"type":"read","room":"r","seq":1.5}"#,
            r#"{"type":"read","room":"r","seq":"3"}"#,
            r#"{"type":"read","room":"r","seq":null}"#,
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{bad}");
        }
        let v: Value = serde_json::from_str(&signal_frame("r", "al\"ice", r#"{"t":1}"#)).unwrap();
        assert_eq!(
            v,
            json!({"type":"signal","room":"r","from":"al\"ice","body":{"t":1}})
        );
        let r = Ref("6".into());
        let v: Value = serde_json::from_str(&read_frame("r", 57, Some(&r))).unwrap();
        assert_eq!(v, json!({"type":"read","room":"r","seq":57,"ref":6}));
        let v: Value =
            serde_json::from_str(&joined_frame("g", 3, 1, false, Some(0), None)).unwrap();
        assert_eq!(
            v,
            json!({"type":"joined","room":"g","head":3,"first":1,"read":0})
        );
    }

    #[test]
    fn lone_surrogates_are_found() {
        for (json, lone) in [
            (r#""plain""#, false),
            (r#""\u00e9 \n \\ \" \u0000""#, false),
            (r#""\ud83d\ude00""#, false),
            (r#""\uD83D\uDE00 and \uDBFF\uDFFF""#, false),
            (r#""\\udead""#, false), // an escaped backslash, then the text `udead`
            (r#""\\\udead""#, true),
            (r#""\udead""#, true),
            (r#""\ud83d""#, true),
            (r#""\ud83dx""#, true),
            (r#""\ud83d\n""#, true),
            (r#""\ud83d\u0041""#, true),
            (r#""\ud83d\ud83d\ude00""#, true),
            (r#""\ude00\ud83d""#, true),
            (r#"{"a":["\uDFFF"]}"#, true),
            (r#"{"\udead":1}"#, true),
        ] {
            assert_eq!(has_lone_surrogate(json), lone, "{json}");
            // The reference: serde_json's strict parse into a `Value`.
            let strict = serde_json::from_str::<Value>(json).is_ok();
            assert_eq!(strict, !lone, "{json}");
        }
    }

    #[test]
    fn bodies_idems_and_refs_must_be_unicode_without_nul() {
        let code = |s: &str| parse(s).map(|_| ()).map_err(|e| (e.code, e.reply_ref));
        let r = Some(Ref("5".into()));
        for bad in [
            r#"{"type":"send","room":"a","body":"\udead","ref":5}"#,
            r#"{"type":"send","room":"a","body":{"k":["\ud800"]},"ref":5}"#,
            r#"{"type":"send","room":"a","body":1,"idem":"\udead","ref":5}"#,
            r#"{"type":"send","room":"a","body":1,"idem":"\u0000","ref":5}"#,
            r#"{"type":"send","room":"a","body":1,"idem":"k\u0000","ref":5}"#,
        ] {
            assert_eq!(code(bad), Err((ErrorCode::BadRequest, r.clone())), "{bad}");
        }
        assert_eq!(
            code(r#"{"type":"ping","ref":"\udead"}"#),
            Err((ErrorCode::BadRequest, None)),
            "a ref that cannot be echoed is not echoed"
        );
        // A NUL escape in a body is six ASCII characters (fine for a TEXT column); a raw NUL
        // byte is not JSON at all, in a string or outside one.
        assert!(code(r#"{"type":"send","room":"a","body":"\u0000"}"#).is_ok());
        assert!(code("{\"type\":\"send\",\"room\":\"a\",\"body\":\"\0\"}").is_err());
        assert!(code("{\"type\":\"send\",\"room\":\"a\",\"body\":1\0}").is_err());
        assert!(
            code(r#"{"type":"send","room":"a","body":"\ud83d\ude00","idem":"\ud83d\ude00"}"#)
                .is_ok()
        );
    }

    #[test]
    fn auth_frames_parse_and_hide_the_token() {
        let frame = parse(r#"{"type":"auth","token":"abc.def.ghi","ref":9}"#).unwrap();
        assert_eq!(
            frame,
            ClientFrame::Auth {
                token: Token("abc.def.ghi".into()),
                reply_ref: Some(Ref("9".into()))
            }
        );
        assert!(!format!("{frame:?}").contains("abc.def"));
    }
}
