//! Frames encoded by phoenix.js's own Serializer (see tests/js/scripts/capture-frames.js) decode to
//! the messages it was given, and our client-side encoder produces the same bytes.

use bytes::Bytes;
use fawkes_serializer::{Frame, Message, Payload, Ref, Serializer};
use serde_json::Value;

fn fixture() -> Vec<Value> {
    serde_json::from_str(include_str!("fixtures/phoenix-js-frames.json")).expect("fixture is JSON")
}

fn bytes(v: &Value) -> Bytes {
    v.as_array().expect("byte array").iter().map(|b| b.as_u64().expect("byte") as u8).collect::<Vec<_>>().into()
}

fn opt_ref(v: &Value) -> Option<Ref> {
    v.as_str().map(Ref::new)
}

#[test]
fn phoenix_js_frames_decode_and_reencode_byte_for_byte() {
    let cases = fixture();
    assert!(cases.len() >= 5);
    for case in cases {
        let m = &case["message"];
        let payload = match m["payload"].get("binary") {
            Some(b) => Payload::Binary(bytes(b)),
            None => Payload::Json(m["payload"].clone()),
        };
        let expected = Message {
            join_ref: opt_ref(&m["join_ref"]),
            msg_ref: opt_ref(&m["ref"]),
            topic: m["topic"].as_str().expect("topic").into(),
            event: m["event"].as_str().expect("event").into(),
            payload,
        };
        let frame = match (case["frame"].get("text"), case["frame"].get("binary")) {
            (Some(t), _) => Frame::text(t.as_str().expect("text")),
            (_, Some(b)) => Frame::Binary(bytes(b)),
            _ => panic!("bad fixture {case}"),
        };
        assert_eq!(Serializer::V2.decode(&frame).expect("decodes"), expected, "{case}");
        assert_eq!(Serializer::V2.encode_message(&expected).expect("encodes"), frame, "{case}");
    }
}
