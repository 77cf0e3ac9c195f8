//! The wire forms, byte for byte, against frames captured from Phoenix and phoenix.js.

use bytes::Bytes;
use fawkes_serializer::{
    Broadcast, DecodeError, Frame, Message, Payload, Push, Ref, Reply, ReplyStatus, Serializer, ServerMessage,
};
use serde_json::json;

fn bin(parts: &[&[u8]]) -> Frame {
    Frame::Binary(Bytes::from(parts.concat()))
}

fn reply_to(m: &Message, status: ReplyStatus, response: Payload) -> Reply {
    Reply { join_ref: m.join_ref.clone(), msg_ref: m.msg_ref.clone(), topic: m.topic.clone(), status, response }
}

#[test]
fn binary_push_and_reply_match_phoenix_capture() {
    let push = bin(&[&[0, 1, 1, 8, 4], b"1", b"3", b"room:bin", b"ping", &[0, 1, 2, 0xfa, 0xff, 0x0a, 0x0d]]);
    let m = Serializer::V2.decode(&push).expect("valid push");
    assert_eq!(m.join_ref, Some(Ref::new("1")));
    assert_eq!(m.msg_ref, Some(Ref::new("3")));
    assert_eq!((m.topic.as_str(), m.event.as_str()), ("room:bin", "ping"));
    assert_eq!(m.payload, Payload::Binary(Bytes::from_static(&[0, 1, 2, 0xfa, 0xff, 0x0a, 0x0d])));

    let reply = Serializer::V2.encode_reply(&reply_to(&m, ReplyStatus::Ok, m.payload.clone())).expect("encodes");
    let expected = bin(&[&[1, 1, 1, 8, 2], b"1", b"3", b"room:bin", b"ok", &[0, 1, 2, 0xfa, 0xff, 0x0a, 0x0d]]);
    assert_eq!(reply, expected);
}

#[test]
fn binary_broadcast_and_server_push_layouts() {
    let b = Broadcast { topic: "t".into(), event: "ev".into(), payload: Payload::from(vec![9u8, 8]) };
    assert_eq!(Serializer::V2.encode_broadcast(&b).expect("encodes"), bin(&[&[2, 1, 2], b"t", b"ev", &[9, 8]]));

    // A server push carries no ref byte: kind, len(join_ref), len(topic), len(event).
    let p = Push {
        join_ref: Some(Ref::new("12")),
        msg_ref: None,
        topic: "t".into(),
        event: "ev".into(),
        payload: Payload::from(vec![7u8]),
    };
    let frame = Serializer::V2.encode_push(&p).expect("encodes");
    assert_eq!(frame, bin(&[&[0, 2, 1, 2], b"12", b"t", b"ev", &[7]]));
    assert_eq!(Serializer::V2.decode_server(&frame).expect("decodes"), ServerMessage::Push(p));
}

#[test]
fn v1_reply_matches_phoenix_byte_for_byte() {
    let join = Serializer::V1
        .decode(&Frame::text(r#"{"topic":"room:v1","event":"phx_join","payload":{},"ref":"1"}"#))
        .expect("valid V1 join");
    assert_eq!(join.join_ref, None);
    let frame = Serializer::V1.encode_reply(&reply_to(&join, ReplyStatus::Ok, Payload::empty())).expect("encodes");
    assert_eq!(
        frame,
        Frame::text(r#"{"event":"phx_reply","payload":{"response":{},"status":"ok"},"ref":"1","topic":"room:v1"}"#)
    );
}

#[test]
fn v1_close_carries_the_join_ref_in_ref_and_no_join_ref_key() {
    let close = Push {
        join_ref: Some(Ref::new("1")),
        msg_ref: Some(Ref::new("1")),
        topic: "room:v1".into(),
        event: "phx_close".into(),
        payload: Payload::empty(),
    };
    assert_eq!(
        Serializer::V1.encode_push(&close).expect("encodes"),
        Frame::text(r#"{"event":"phx_close","payload":{},"ref":"1","topic":"room:v1"}"#)
    );
}

#[test]
fn v2_heartbeat_reply_is_phoenix_form() {
    let hb = Serializer::V2.decode(&Frame::text(r#"[null,"7","phoenix","heartbeat",{}]"#)).expect("valid");
    let frame = Serializer::V2.encode_reply(&reply_to(&hb, ReplyStatus::Ok, Payload::empty())).expect("encodes");
    assert_eq!(frame, Frame::text(r#"[null,"7","phoenix","phx_reply",{"response":{},"status":"ok"}]"#));
}

#[test]
fn numeric_refs_are_echoed_as_numbers() {
    let m = Serializer::V2.decode(&Frame::text(r#"[5,42,"room:1","ping",{}]"#)).expect("valid");
    assert!(m.msg_ref.as_ref().is_some_and(Ref::is_numeric));
    let frame = Serializer::V2.encode_reply(&reply_to(&m, ReplyStatus::Error, Payload::empty())).expect("encodes");
    assert_eq!(frame, Frame::text(r#"[5,42,"room:1","phx_reply",{"response":{},"status":"error"}]"#));
}

#[test]
fn a_sixth_element_is_ignored_and_nulls_are_read_as_empty() {
    let m = Serializer::V2.decode(&Frame::text(r#"["1","2","t","e",{"a":1},"extra"]"#)).expect("valid");
    assert_eq!(m.payload, Payload::Json(json!({"a": 1})));
    let m = Serializer::V2.decode(&Frame::text("[null,null,null,null,null]")).expect("valid");
    assert_eq!((m.topic.as_str(), m.event.as_str(), m.msg_ref), ("", "", None));
}

/// A frame and what its error must be.
type Case = (&'static str, fn(&DecodeError) -> bool);

#[test]
fn malformed_frames_are_typed_errors() {
    let cases: &[Case] = &[
        ("[\"1\", not json", |e| matches!(e, DecodeError::Json(_))),
        ("{not json", |e| matches!(e, DecodeError::Shape(_) | DecodeError::Json(_))),
        ("", |e| matches!(e, DecodeError::Json(_))),
        (r#"["1","2","t","e"]"#, |e| matches!(e, DecodeError::Shape(_))),
        (r#"{"topic":"t"}"#, |e| matches!(e, DecodeError::Shape(_))),
        ("42", |e| matches!(e, DecodeError::Shape(_))),
        (r#"[{},"2","t","e",{}]"#, |e| matches!(e, DecodeError::Shape(_))),
        (r#"["1","2",7,"e",{}]"#, |e| matches!(e, DecodeError::Shape(_))),
    ];
    for (text, check) in cases {
        let err = Serializer::V2.decode(&Frame::text(*text)).expect_err(text);
        assert!(check(&err), "{text:?} gave {err:?}");
    }
    assert!(matches!(Serializer::V1.decode(&Frame::text(r#"["1","2","t","e",{}]"#)), Err(DecodeError::Shape(_))));
    assert!(matches!(
        Serializer::V1.decode(&Frame::Binary(Bytes::from_static(&[0]))),
        Err(DecodeError::BinaryNotSupported(_))
    ));
}

#[test]
fn malformed_binary_frames_are_typed_errors() {
    let short = Serializer::V2.decode(&bin(&[&[0, 5, 1, 1, 1], b"ab"]));
    assert!(matches!(short, Err(DecodeError::BinaryTooShort { .. })), "{short:?}");
    let kind = Serializer::V2.decode(&bin(&[&[2, 1, 1], b"t", b"e"]));
    assert!(matches!(kind, Err(DecodeError::UnexpectedBinaryKind(2))), "{kind:?}");
    let utf8 = Serializer::V2.decode(&bin(&[&[0, 0, 0, 1, 1], &[0xff], b"e"]));
    assert!(matches!(utf8, Err(DecodeError::BinaryFieldNotUtf8("topic"))), "{utf8:?}");
    assert!(Serializer::V2.decode(&Frame::Binary(Bytes::new())).is_err());
}

#[test]
fn every_byte_prefix_of_a_frame_decodes_or_errors_without_panicking() {
    let text = br#"["1","2","room:lobby","new_msg",{"body":"h\u00e9llo","n":[1,2.5,null]}]"#;
    for end in 0..text.len() {
        let _ = Serializer::V2.decode(&Frame::Text(Bytes::copy_from_slice(&text[..end])));
        let _ = Serializer::V1.decode(&Frame::Text(Bytes::copy_from_slice(&text[..end])));
    }
    let b = [&[0u8, 1, 1, 4, 4][..], b"1", b"2", b"t:ab", b"ping", &[1, 2, 3]].concat();
    for end in 0..b.len() {
        let _ = Serializer::V2.decode(&Frame::Binary(Bytes::copy_from_slice(&b[..end])));
    }
}

#[test]
fn client_messages_round_trip_in_every_form() {
    let messages = [
        Message {
            join_ref: Some(Ref::new("1")),
            msg_ref: Some(Ref::new("2")),
            topic: "room:lobby".into(),
            event: "new_msg".into(),
            payload: Payload::Json(json!({"body": "quote \" and \\ and ünïcode"})),
        },
        Message {
            join_ref: None,
            msg_ref: Some(Ref::new("3")),
            topic: "phoenix".into(),
            event: "heartbeat".into(),
            payload: Payload::empty(),
        },
    ];
    for s in [Serializer::V1, Serializer::V2, Serializer::V2Text] {
        for m in &messages {
            let frame = s.encode_message(m).expect("encodes");
            assert_eq!(&s.decode(&frame).expect("decodes"), m, "{s:?}");
        }
    }
    let binary = Message { payload: Payload::from(vec![0u8, 255, 10]), ..messages[0].clone() };
    let frame = Serializer::V2.encode_message(&binary).expect("encodes");
    assert!(matches!(frame, Frame::Binary(_)));
    assert_eq!(Serializer::V2.decode(&frame).expect("decodes"), binary);
}

#[test]
fn text_only_serializers_carry_binary_payloads_as_base64() {
    let b = Broadcast { topic: "t".into(), event: "e".into(), payload: Payload::from(vec![1u8, 2, 3, 255]) };
    assert_eq!(
        Serializer::V2Text.encode_broadcast(&b).expect("encodes"),
        Frame::text(r#"[null,null,"t","e",{"binary":"AQID/w=="}]"#)
    );
    assert_eq!(
        Serializer::V1.encode_broadcast(&b).expect("encodes"),
        Frame::text(r#"{"event":"e","payload":{"binary":"AQID/w=="},"ref":null,"topic":"t"}"#)
    );
}

#[test]
fn binary_fields_longer_than_255_bytes_are_refused() {
    let b = Broadcast { topic: "t".repeat(256), event: "e".into(), payload: Payload::from(vec![1u8]) };
    assert!(Serializer::V2.encode_broadcast(&b).is_err());
}

#[test]
fn vsn_selects_the_serializer_as_phoenix_does() {
    assert_eq!(Serializer::from_vsn(None).ok(), Some(Serializer::V1));
    assert_eq!(Serializer::from_vsn(Some("1.0.0")).ok(), Some(Serializer::V1));
    assert_eq!(Serializer::from_vsn(Some("2.0.0")).ok(), Some(Serializer::V2));
    for bad in ["3.0.0", "", "2.x", "abc", "2..0"] {
        assert!(Serializer::from_vsn(Some(bad)).is_err(), "{bad}");
    }
}
