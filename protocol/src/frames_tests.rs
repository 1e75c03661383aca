//! Tests of `frames`: parsing client frames and writing server frames.

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
            presence: false,
            reply_ref: Some(Ref("1".into()))
        }
    );
    match parse(r#"{"type":"send","room":"a","body":{"x": [1, 2]},"idem":"k","ref":"r"}"#).unwrap()
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
    let v: Value = serde_json::from_str(&error_frame(ErrorCode::LimitExceeded, "", None)).unwrap();
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
    let v: Value = serde_json::from_str(&joined_frame("g", 3, 1, false, Some(0), None)).unwrap();
    assert_eq!(
        v,
        json!({"type":"joined","room":"g","head":3,"first":1,"read":0})
    );
}

#[test]
fn presence_is_asked_for_and_written() {
    let join = |extra: &str| parse(&format!(r#"{{"type":"join","room":"r"{extra}}}"#));
    assert!(matches!(
        join(r#","presence":true"#),
        Ok(ClientFrame::Join { presence: true, .. })
    ));
    assert!(matches!(
        join(""),
        Ok(ClientFrame::Join {
            presence: false,
            ..
        })
    ));
    assert!(matches!(
        join(r#","presence":null"#),
        Ok(ClientFrame::Join {
            presence: false,
            ..
        })
    ));
    assert!(join(r#","presence":"yes""#).is_err());
    let listed = Present::Users(vec!["a\"b", "bob"]);
    let v: Value = serde_json::from_str(&joined_frame_with(
        "g",
        &Joined {
            head: 3,
            first: 1,
            read: Some(2),
            presence: Some(&listed),
            ..Joined::default()
        },
        Some(&Ref("7".into())),
    ))
    .unwrap();
    assert_eq!(
        v,
        json!({"type":"joined","room":"g","head":3,"first":1,"read":2,"presence":["a\"b","bob"],"ref":7})
    );
    let counted: Present<&str> = Present::Count(120_000);
    let v: Value = serde_json::from_str(&joined_frame_with(
        "g",
        &Joined {
            presence: Some(&counted),
            ..Joined::default()
        },
        None,
    ))
    .unwrap();
    assert_eq!(v["presence_count"], 120_000);
    assert!(v.get("presence").is_none());
    let v: Value = serde_json::from_str(&presence_frame("g", &["carol"], &[])).unwrap();
    assert_eq!(v, json!({"type":"presence","room":"g","joined":["carol"]}));
    let v: Value = serde_json::from_str(&presence_frame("g", &["c"], &["d", "e"])).unwrap();
    assert_eq!(
        v,
        json!({"type":"presence","room":"g","joined":["c"],"left":["d","e"]})
    );
    let v: Value = serde_json::from_str(&presence_reset_frame("g", &counted)).unwrap();
    assert_eq!(v, json!({"type":"presence","room":"g","count":120_000}));
    let v: Value =
        serde_json::from_str(&presence_reset_frame("g", &Present::Users(vec!["x"]))).unwrap();
    assert_eq!(v, json!({"type":"presence","room":"g","users":["x"]}));
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
        code(r#"{"type":"send","room":"a","body":"\ud83d\ude00","idem":"\ud83d\ude00"}"#).is_ok()
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
