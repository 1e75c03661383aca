//! The properties themselves, as plain functions of their input: what must hold for *any*
//! client frame and *any* (pattern, room name) pair.
//!
//! Two drivers share this file:
//! - `server/tests/properties.rs` (`cargo test --test properties`): proptest feeds these
//!   functions random and structured inputs, a bounded number of cases per run (CI's smoke run);
//! - `fuzz/fuzz_targets/*.rs` (`fuzz/run.sh`): libFuzzer feeds them coverage-guided inputs for
//!   as long as it is left running. They include this file by path, so it depends on nothing
//!   but `seqcast_protocol`, `serde_json`, `uuid` and `std`.
//!
//! A violated property panics (with the input in the message); that is how both drivers see it.
#![allow(dead_code)] // each driver uses a different part

use std::collections::HashMap;

use serde_json::value::RawValue;

use seqcast_protocol::{
    self as protocol, parse_client_frame, pattern_matches, validate_room, ClientFrame, ErrorCode,
    Ref, StoredMessage, MAX_ROOM_LEN,
};

/// Longest `idem` the protocol accepts, in bytes.
pub const MAX_IDEM_BYTES: usize = 256;

/// Parses `text` as a client frame with body limit `max_body` and checks the outcome:
/// never a panic; an accepted frame has a valid room, a body within the limit that is JSON, a
/// valid `idem` and a `ref` that is a JSON number or string; a refused one has a code a client
/// can act on; and every reply built from either outcome is one JSON object echoing the `ref`.
pub fn check_client_text(text: &str, max_body: usize) {
    match parse_client_frame(text, max_body) {
        Ok(frame) => check_accepted(text, &frame, max_body),
        Err(e) => {
            assert!(
                matches!(e.code, ErrorCode::BadRequest | ErrorCode::TooLarge),
                "parsing may only fail with bad_request or too_large, got {:?} for {text:?}",
                e.code
            );
            assert!(!e.message.is_empty(), "an error says why: {text:?}");
            let reply = protocol::error_frame(e.code, &e.message, e.reply_ref.as_ref());
            check_reply(&reply, "error", e.reply_ref.as_ref(), text);
        }
    }
}

/// [`check_client_text`] for raw bytes, as a WebSocket text frame carries them: bytes that are
/// not UTF-8 never reach the parser (tungstenite refuses such a text frame), so they are checked
/// as their lossy decoding, which is what a client could send instead.
pub fn check_client_bytes(data: &[u8], max_body: usize) {
    match std::str::from_utf8(data) {
        Ok(text) => check_client_text(text, max_body),
        Err(_) => check_client_text(&String::from_utf8_lossy(data), max_body),
    }
}

fn check_accepted(text: &str, frame: &ClientFrame, max_body: usize) {
    let room_ok = |room: &str| {
        assert!(
            validate_room(room).is_ok() && !room.is_empty() && room.len() <= MAX_ROOM_LEN,
            "accepted frame with an invalid room {room:?}: {text:?}"
        );
    };
    #[allow(unreachable_patterns)] // frame types added later are checked for their `ref` only
    match frame {
        ClientFrame::Join {
            room, reply_ref, ..
        } => {
            room_ok(room);
            check_reply(
                &protocol::joined_frame(room, 7, 1, false, Some(3), reply_ref.as_ref()),
                "joined",
                reply_ref.as_ref(),
                text,
            );
        }
        ClientFrame::Leave { room, reply_ref } => {
            room_ok(room);
            check_reply(
                &protocol::left_frame(room, reply_ref.as_ref()),
                "left",
                reply_ref.as_ref(),
                text,
            );
        }
        ClientFrame::Send {
            room,
            body,
            idem,
            reply_ref,
        } => {
            room_ok(room);
            assert!(
                body.len() <= max_body,
                "accepted a {}-byte body over the {max_body}-byte limit: {text:?}",
                body.len()
            );
            assert!(
                serde_json::from_str::<&RawValue>(body).is_ok(),
                "accepted body is not one JSON value: {body:?} in {text:?}"
            );
            // Bodies are replayed to clients whose parsers may be strict: an accepted body must
            // be Unicode (no lone surrogate escape). serde_json's `Value` is such a parser; the
            // one thing it refuses in valid JSON besides is a number beyond f64 (`1e400`).
            if let Err(e) = serde_json::from_str::<serde_json::Value>(body) {
                assert!(
                    e.to_string().starts_with("number out of range"),
                    "accepted a body a strict parser refuses ({e}): {body:?} in {text:?}"
                );
            }
            if let Some(idem) = idem {
                assert!(
                    !idem.is_empty() && idem.len() <= MAX_IDEM_BYTES && !idem.contains('\0'),
                    "accepted an idem of {} bytes (or with a NUL): {text:?}",
                    idem.len()
                );
            }
            // The body is spliced into `message` frames as it came: it must stay one JSON value
            // there, equal to what the client sent.
            let stored = StoredMessage {
                room: room.clone(),
                seq: 1,
                id: uuid::Uuid::nil(),
                sender: "u\"ser".into(),
                body: body.clone(),
                ts_ms: 0,
            };
            // (Read as raw fields: a body such as `1e400` is valid JSON that `Value` refuses.)
            let frame = protocol::message_frame(&stored);
            let fields: HashMap<String, &RawValue> = serde_json::from_str(&frame)
                .unwrap_or_else(|e| panic!("message frame {frame:?} is not JSON ({e}): {text:?}"));
            assert_eq!(
                fields.get("body").map(|b| b.get()),
                Some(body.as_str()),
                "body changed on the way: {text:?}"
            );
            check_reply(
                &protocol::ack_frame(&stored, reply_ref.as_ref()),
                "ack",
                reply_ref.as_ref(),
                text,
            );
        }
        ClientFrame::Read {
            room,
            seq,
            reply_ref,
        } => {
            room_ok(room);
            check_reply(
                &protocol::read_frame(room, *seq, reply_ref.as_ref()),
                "read",
                reply_ref.as_ref(),
                text,
            );
        }
        ClientFrame::Signal { room, body, .. } => {
            room_ok(room);
            // Relayed as it came: it must stay one JSON value in the `signal` frame.
            let frame = protocol::signal_frame(room, "u\"ser", body);
            let fields: HashMap<String, &RawValue> = serde_json::from_str(&frame)
                .unwrap_or_else(|e| panic!("signal frame {frame:?} is not JSON ({e}): {text:?}"));
            assert_eq!(fields.get("body").map(|b| b.get()), Some(body.as_str()));
        }
        ClientFrame::Ping { reply_ref } => check_reply(
            &protocol::pong_frame(reply_ref.as_ref()),
            "pong",
            reply_ref.as_ref(),
            text,
        ),
        _ => {}
    }
}

/// A server frame must be one JSON object of type `ty` whose `ref` is the client's, byte for
/// byte. (Fields are read raw: a `ref` such as `1e400` is valid JSON that `Value` refuses.)
fn check_reply(reply: &str, ty: &str, reply_ref: Option<&Ref>, input: &str) {
    let fields: HashMap<String, &RawValue> = serde_json::from_str(reply)
        .unwrap_or_else(|e| panic!("reply {reply:?} is not a JSON object ({e}); input {input:?}"));
    let kind = fields.get("type").map(|t| t.get());
    assert_eq!(
        kind,
        Some(format!("{ty:?}").as_str()),
        "reply {reply:?} to {input:?}"
    );
    match reply_ref {
        None => assert!(!fields.contains_key("ref"), "unasked ref in {reply:?}"),
        Some(r) => {
            let sent = r.as_json();
            assert!(
                !sent.starts_with('"') || serde_json::from_str::<String>(sent).is_ok(),
                "a string ref echoed must be Unicode, got {sent:?} from {input:?}"
            );
            assert!(
                serde_json::from_str::<&RawValue>(sent).is_ok()
                    && (sent.starts_with('"')
                        || sent
                            .starts_with(['-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'])),
                "ref must be a JSON number or string, got {sent:?} from {input:?}"
            );
            assert_eq!(
                fields.get("ref").map(|v| v.get()),
                Some(sent),
                "reply {reply:?} to {input:?}"
            );
        }
    }
}

/// `pattern_matches(pattern, name)` against [`reference_matches`], plus the two properties the
/// protocol states outright: a pattern without `*` matches exactly itself, and a pattern of
/// only `*` matches everything.
pub fn check_pattern(pattern: &str, name: &str) {
    let got = pattern_matches(pattern, name);
    assert_eq!(
        got,
        reference_matches(pattern, name),
        "pattern_matches({pattern:?}, {name:?}) disagrees with the reference"
    );
    if !pattern.contains('*') {
        assert_eq!(got, pattern == name, "{pattern:?} vs {name:?}");
    }
    if !pattern.is_empty() && pattern.chars().all(|c| c == '*') {
        assert!(got, "{pattern:?} must match {name:?}");
    }
    if !name.contains('*') {
        assert!(pattern_matches(name, name), "{name:?} must match itself");
        assert!(
            pattern_matches(&format!("{name}*"), name)
                && pattern_matches(&format!("*{name}"), name),
            "a name must match itself followed or preceded by `*`: {name:?}"
        );
    }
}

/// [`check_pattern`] on input split from raw bytes (the fuzz target's input): the first byte
/// says where the pattern ends; both halves are capped so the reference stays cheap.
pub fn check_pattern_bytes(data: &[u8]) {
    const CAP: usize = 256;
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let split = usize::from(split).min(rest.len());
    let (pattern, name) = rest.split_at(split);
    let pattern = String::from_utf8_lossy(&pattern[..pattern.len().min(CAP)]);
    let name = String::from_utf8_lossy(&name[..name.len().min(CAP)]);
    check_pattern(&pattern, &name);
}

/// The textbook dynamic-programming glob match over characters: `m[i][j]` says whether the
/// first `i` characters of the pattern match the first `j` of the name. Quadratic, obviously
/// right, and independent of seqcast's byte-wise backtracking matcher.
pub fn reference_matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let mut m = vec![vec![false; n.len() + 1]; p.len() + 1];
    m[0][0] = true;
    for i in 1..=p.len() {
        for j in 0..=n.len() {
            m[i][j] = if p[i - 1] == '*' {
                m[i - 1][j] || (j > 0 && m[i][j - 1])
            } else {
                j > 0 && p[i - 1] == n[j - 1] && m[i - 1][j - 1]
            };
        }
    }
    m[p.len()][n.len()]
}
