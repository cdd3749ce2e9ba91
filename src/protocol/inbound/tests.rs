#[test]
fn half_a_surrogate_pair_is_refused_and_a_whole_pair_passes() {
    let check = |json: &str| {
        let raw: &RawValue = serde_json::from_str(json).unwrap();
        check_content(raw, "content", 32).map_err(|e| e.code)
    };
    assert_eq!(check(r#""\ud83d\ude00 ok""#), Ok(()));
    assert_eq!(check(r#"{"a":"\u00e9\n\\u\"x"}"#), Ok(()));
    for lone in [
        r#""\ud83d""#,
        r#""\ude00""#,
        r#"["\ud83dx"]"#,
        r#""\uD800\u0041""#,
    ] {
        assert_eq!(check(lone), Err(ErrorCode::InvalidField), "{lone}");
    }
}
use super::*;

fn code(text: &str) -> ErrorCode {
    parse(text.as_bytes()).unwrap_err().code
}

#[test]
fn message_keeps_content_as_sent() {
    let text = br#"{"type":"message","roomId":"r1","content":{"a": [1, 2.50]}}"#;
    match parse(text).unwrap() {
        ClientFrame::Message { room, content, .. } => {
            assert_eq!(room, "r1");
            assert_eq!(content.get(), r#"{"a": [1, 2.50]}"#);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn numeric_room_ids_are_their_decimal_string() {
    match parse(br#"{"type":"join","roomId":42}"#).unwrap() {
        ClientFrame::Join { room, replay, .. } => {
            assert_eq!(room, "42");
            assert_eq!(replay, None);
        }
        other => panic!("unexpected {other:?}"),
    }
    match parse(br#"{"type":"join","roomId":"r\u00e9"}"#).unwrap() {
        ClientFrame::Join { room, .. } => assert_eq!(room, "ré"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn joins_ask_for_history_or_a_position() {
    let replay = |text: &str| match parse(text.as_bytes()) {
        Ok(ClientFrame::Join { replay, .. }) => Ok(replay),
        Ok(other) => panic!("unexpected {other:?}"),
        Err(e) => Err(e.code),
    };
    assert_eq!(
        replay(r#"{"type":"join","roomId":"r","history":1}"#),
        Ok(Some(Replay::Last(1)))
    );
    assert_eq!(
        replay(r#"{"type":"join","roomId":"r","since":{"offset":7,"epoch":"e1"}}"#),
        Ok(Some(Replay::Since {
            offset: 7,
            epoch: "e1".into()
        }))
    );
    for bad in [
        r#"{"type":"join","roomId":"r","history":-1}"#,
        r#"{"type":"join","roomId":"r","history":"all"}"#,
        r#"{"type":"join","roomId":"r","since":{"offset":7}}"#,
        r#"{"type":"join","roomId":"r","history":1,"since":{"offset":7,"epoch":"e"}}"#,
    ] {
        assert_eq!(replay(bad), Err(ErrorCode::InvalidField), "{bad}");
    }
}

#[test]
fn null_content_is_content() {
    match parse(br#"{"type":"message","roomId":"r","content":null}"#).unwrap() {
        ClientFrame::Message { content, .. } => assert_eq!(content.get(), "null"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn deep_nesting_and_huge_numbers_are_refused() {
    let check = |json: &str| {
        let raw = RawValue::from_string(json.to_string()).unwrap();
        check_content(&raw, "content", 3)
    };
    assert!(check(r#"{"a":[{"b":"[[[[[[\"]]]"}]}"#).is_ok());
    assert!(check(r#"[[[1]]]"#).is_ok());
    assert_eq!(
        check(r#"[[[[1]]]]"#).unwrap_err().code,
        ErrorCode::InvalidField
    );
    assert!(check(r#"[-1.5e300, 12345678901234567890, 0.1]"#).is_ok());
    assert!(check("1e400").is_err());
    assert!(check(&"9".repeat(5000)).is_err());
    assert!(check(r#""9999999999999999999999999999999999999999999999999999""#).is_ok());
}

#[test]
fn bad_input_gets_its_code() {
    assert_eq!(code("not json"), ErrorCode::BadJson);
    assert_eq!(code("[1,2]"), ErrorCode::BadJson);
    assert_eq!(code(r#"{"type":"join","roomId":"a""#), ErrorCode::BadJson);
    assert_eq!(code(r#"{"roomId":"a"}"#), ErrorCode::MissingField);
    assert_eq!(code(r#"{"type":7}"#), ErrorCode::InvalidField);
    assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
    assert_eq!(code(r#"{"type":"join"}"#), ErrorCode::MissingField);
    assert_eq!(
        code(r#"{"type":"join","roomId":""}"#),
        ErrorCode::InvalidField
    );
    assert_eq!(
        code(r#"{"type":"join","roomId":1.5}"#),
        ErrorCode::InvalidField
    );
    assert_eq!(
        code(r#"{"type":"join","roomId":{"a":1}}"#),
        ErrorCode::InvalidField
    );
    assert_eq!(
        code(r#"{"type":"message","roomId":"a"}"#),
        ErrorCode::MissingField
    );
    assert_eq!(code(r#"{"type":"broadcast"}"#), ErrorCode::MissingField);
    let long = format!(r#"{{"type":"join","roomId":"{}"}}"#, "x".repeat(300));
    assert_eq!(code(&long), ErrorCode::InvalidField);
}
