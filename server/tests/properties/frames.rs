//! Client frame parsing (`seqcast_protocol::parse_client_frame`).

use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use seqcast_protocol::{parse_client_frame, ClientFrame, ErrorCode};

use crate::checks::{check_client_bytes, check_client_text};
use crate::config;

/// Any JSON value, a few levels deep. Numbers are integers or dyadic fractions, which every JSON
/// parser reads back exactly, so a round trip can be compared by value.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1_000_000i32..1_000_000).prop_map(|n| Value::from(f64::from(n) / 8.0)),
        any::<String>().prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..6).prop_map(Value::from),
            btree_map(any::<String>(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Room names as the protocol defines them: 1 to 128 of `A-Z a-z 0-9 _ . : -`.
fn valid_room() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.:-]{1,128}"
}

/// Room names a client might send: valid ones, near misses (empty, too long, a bad character)
/// and anything at all.
fn any_room() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => valid_room().prop_map(Value::from),
        1 => "[A-Za-z0-9_.:-]{129,140}".prop_map(Value::from),
        1 => "[A-Za-z0-9 /é*\"\\\\]{0,8}".prop_map(Value::from),
        1 => json_value(),
    ]
}

/// A `ref` as the protocol allows it: absent, a number or a string.
fn valid_ref() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        any::<u64>().prop_map(|n| Some(Value::from(n))),
        any::<i64>().prop_map(|n| Some(Value::from(n))),
        any::<String>().prop_map(|s| Some(Value::from(s))),
    ]
}

/// `idem` as the protocol allows it: 1 to 256 bytes, no U+0000.
fn valid_idem() -> impl Strategy<Value = Option<String>> {
    proptest::option::of(any::<String>().prop_filter("1 to 256 bytes, no NUL", |s| {
        !s.is_empty() && s.len() <= 256 && !s.contains('\0')
    }))
}

/// A JSON string literal made of escapes that are easy to get wrong: surrogates alone, in pairs
/// and in the wrong order, escaped backslashes before a `u`, and plain text.
fn escape_heavy_string() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just("a"),
        Just("u"),
        Just("d800"),
        Just("é"),
        Just(r"\\"),
        Just(r#"\""#),
        Just(r"\n"),
        Just(r"\u0000"),
        Just(r"\u00e9"),
        Just(r"\ud83d"),
        Just(r"\uD83D"),
        Just(r"\ude00"),
        Just(r"\uDFFF"),
        Just(r"\udbff"),
        Just(r"\ud83d\ude00"),
    ];
    vec(piece, 0..12).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
}

/// A well-formed client frame.
#[derive(Debug, Clone)]
enum Valid {
    Join {
        room: String,
        since: Option<u64>,
    },
    Leave {
        room: String,
    },
    Send {
        room: String,
        body: Value,
        idem: Option<String>,
    },
    Ping,
}

fn valid_frame() -> impl Strategy<Value = Valid> {
    prop_oneof![
        (valid_room(), proptest::option::of(any::<u64>()))
            .prop_map(|(room, since)| Valid::Join { room, since }),
        valid_room().prop_map(|room| Valid::Leave { room }),
        (valid_room(), json_value(), valid_idem()).prop_map(|(room, body, idem)| Valid::Send {
            room,
            body,
            idem
        }),
        Just(Valid::Ping),
    ]
}

impl Valid {
    /// The frame as a client would write it, with `ref` when given and an unknown extra field
    /// when `extra` (clients may be newer than the server).
    fn to_json(&self, reply_ref: Option<&Value>, extra: bool) -> Value {
        let mut v = match self {
            Valid::Join { room, since } => match since {
                Some(since) => json!({"type": "join", "room": room, "since": since}),
                None => json!({"type": "join", "room": room}),
            },
            Valid::Leave { room } => json!({"type": "leave", "room": room}),
            Valid::Send { room, body, idem } => match idem {
                Some(idem) => json!({"type": "send", "room": room, "body": body, "idem": idem}),
                None => json!({"type": "send", "room": room, "body": body}),
            },
            Valid::Ping => json!({"type": "ping"}),
        };
        if let Some(r) = reply_ref {
            v["ref"] = r.clone();
        }
        if extra {
            v["x-future-field"] = json!({"nested": [1, "two"]});
        }
        v
    }
}

/// A JSON object made of the protocol's field names (and a stranger), each holding a value of a
/// plausible or implausible kind: the near misses that exercise every refusal path.
fn frame_shaped() -> impl Strategy<Value = Value> {
    let kind = prop_oneof![
        Just(json!("join")),
        Just(json!("leave")),
        Just(json!("send")),
        Just(json!("ping")),
        Just(json!("auth")),
        Just(json!("JOIN")),
        Just(json!("")),
        json_value(),
    ];
    let since = prop_oneof![
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        json_value(),
    ];
    let idem = prop_oneof![
        "\\PC{0,300}".prop_map(Value::from),
        Just(Value::Null),
        json_value(),
    ];
    let reference = prop_oneof![
        valid_ref().prop_map(|r| r.unwrap_or(Value::Null)),
        json_value(),
    ];
    let token = prop_oneof![any::<String>().prop_map(Value::from), json_value()];
    (
        proptest::option::of(kind),
        proptest::option::of(any_room()),
        proptest::option::of(since),
        proptest::option::of(json_value()),
        proptest::option::of(idem),
        proptest::option::of(reference),
        proptest::option::of(token),
        proptest::option::of((any::<String>(), json_value())),
    )
        .prop_map(
            |(kind, room, since, body, idem, reference, token, stranger)| {
                let mut m = Map::new();
                let fields = [
                    ("type", kind),
                    ("room", room),
                    ("since", since),
                    ("body", body),
                    ("idem", idem),
                    ("ref", reference),
                    ("token", token),
                ];
                for (name, value) in fields {
                    if let Some(value) = value {
                        m.insert(name.to_owned(), value);
                    }
                }
                if let Some((name, value)) = stranger {
                    m.insert(name, value);
                }
                Value::Object(m)
            },
        )
}

// Case counts keep each test near a second in a debug build; `PROPTEST_CASES` raises them.
proptest! {
    #![proptest_config(config(2_000))]

    /// Any text at all: never a panic, and whatever is accepted is valid.
    #[test]
    fn arbitrary_text(text in any::<String>(), max_body in 0_usize..256) {
        check_client_text(&text, max_body);
    }

    /// Any bytes at all (a WebSocket frame's payload).
    #[test]
    fn arbitrary_bytes(data in vec(any::<u8>(), 0..512), max_body in 0_usize..256) {
        check_client_bytes(&data, max_body);
    }
}

proptest! {
    #![proptest_config(config(500))]

    /// JSON objects of the protocol's fields with plausible and implausible values, compact or
    /// pretty, whole or cut short.
    #[test]
    fn frame_shaped_objects(
        frame in frame_shaped(),
        max_body in 0_usize..4096,
        pretty in any::<bool>(),
        cut in any::<prop::sample::Index>(),
    ) {
        let text = if pretty {
            serde_json::to_string_pretty(&frame).unwrap()
        } else {
            frame.to_string()
        };
        check_client_text(&text, max_body);
        let mut end = cut.index(text.len() + 1);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        check_client_text(&text[..end], max_body);
    }

    /// A valid frame, serialized, parses back to itself: compact text keeps the body byte for
    /// byte; pretty text keeps it equal as JSON.
    #[test]
    fn valid_frames_round_trip(
        frame in valid_frame(),
        reply_ref in valid_ref(),
        pretty in any::<bool>(),
        extra in any::<bool>(),
    ) {
        let value = frame.to_json(reply_ref.as_ref(), extra);
        let text = if pretty {
            serde_json::to_string_pretty(&value).unwrap()
        } else {
            value.to_string()
        };
        let parsed = parse_client_frame(&text, usize::MAX)
            .unwrap_or_else(|e| panic!("valid frame {text} refused: {e:?}"));
        check_client_text(&text, usize::MAX);
        let (got_ref, matches) = match (&frame, &parsed) {
            (
                Valid::Join { room, since },
                ClientFrame::Join { room: r, since: s, presence, reply_ref },
            ) => (reply_ref, room == r && since == s && !presence),
            (Valid::Leave { room }, ClientFrame::Leave { room: r, reply_ref }) => {
                (reply_ref, room == r)
            }
            (
                Valid::Send { room, body, idem },
                ClientFrame::Send { room: r, body: b, idem: i, reply_ref },
            ) => {
                let body_kept = if pretty {
                    serde_json::from_str::<Value>(b).ok().as_ref() == Some(body)
                } else {
                    b.as_str() == serde_json::to_string(body).unwrap()
                };
                (reply_ref, room == r && body_kept && idem == i)
            }
            (Valid::Ping, ClientFrame::Ping { reply_ref }) => (reply_ref, true),
            (expected, got) => panic!("{text} parsed as {got:?}, expected {expected:?}"),
        };
        prop_assert!(matches, "{text} parsed as {parsed:?}");
        let got_ref: Option<Value> = got_ref
            .as_ref()
            .map(|r| serde_json::from_str(r.as_json()).unwrap());
        prop_assert_eq!(got_ref, reply_ref, "ref of {}", text);
    }

    /// A body, `idem` or string `ref` with a lone surrogate escape is refused with
    /// `bad_request`, exactly when serde_json's strict string parse refuses it (the reference).
    #[test]
    fn lone_surrogates_are_refused_exactly(s in escape_heavy_string(), field in 0_usize..3) {
        let lone = serde_json::from_str::<String>(&s).is_err();
        prop_assert_eq!(seqcast_protocol::has_lone_surrogate(&s), lone, "{}", &s);
        let text = match field {
            0 => format!(r#"{{"type":"send","room":"r","body":{{"k":[{s}]}},"ref":1}}"#),
            1 => format!(r#"{{"type":"send","room":"r","body":1,"idem":{s},"ref":1}}"#),
            _ => format!(r#"{{"type":"ping","ref":{s}}}"#),
        };
        match parse_client_frame(&text, usize::MAX) {
            Ok(_) => prop_assert!(!lone, "{} accepted", text),
            Err(e) => {
                prop_assert_eq!(e.code, ErrorCode::BadRequest);
                // An idem may also be refused for being empty or holding a NUL.
                prop_assert!(lone || field == 1, "{} refused: {:?}", text, e);
            }
        }
        check_client_text(&text, usize::MAX);
    }

    /// The body limit is exact: a body of exactly `max_body` bytes passes, one more is
    /// `too_large`, and the refusal keeps the frame's `ref`.
    #[test]
    fn body_limit_is_exact(body in json_value(), slack in -2_i64..=2, reply_ref in any::<u32>()) {
        let size = body.to_string().len();
        let max_body = usize::try_from(size as i64 + slack).unwrap_or(0);
        let text = json!({"type": "send", "room": "r", "body": body, "ref": reply_ref}).to_string();
        match parse_client_frame(&text, max_body) {
            Ok(ClientFrame::Send { body: b, .. }) => {
                prop_assert!(size <= max_body, "{size}-byte body accepted under {max_body}");
                prop_assert_eq!(b.len(), size);
            }
            Ok(other) => panic!("{text} parsed as {other:?}"),
            Err(e) => {
                prop_assert!(size > max_body, "{size}-byte body refused under {max_body}: {e:?}");
                prop_assert_eq!(e.code, ErrorCode::TooLarge);
                let r = e.reply_ref.map(|r| r.as_json().to_owned());
                prop_assert_eq!(r, Some(reply_ref.to_string()));
            }
        }
    }
}
