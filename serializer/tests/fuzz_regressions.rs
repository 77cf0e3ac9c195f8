//! Inputs the fuzzers (fuzz/) found, kept as regression tests.

use bytes::Bytes;
use fawkes_serializer::{Frame, Reply, ReplyStatus, Serializer};

/// serializer_v1: a float that serde_json's fast parser read one bit off, so a payload echoed
/// back to the client came back as a different number (1.0777777777777781e111 became
/// 1.077777777777778e111).
#[test]
fn a_float_in_a_payload_comes_back_unchanged() {
    let v1 = r#"{"topic":"room:a","event":"ping","payload":{"n":1.0777777777777781e+111},"ref":"1"}"#;
    let v2 = r#"["1","1","room:a","ping",{"n":1.0777777777777781e+111}]"#;
    for (serializer, text) in [(Serializer::V1, v1), (Serializer::V2, v2)] {
        let message = serializer.decode(&Frame::Text(Bytes::from_static(text.as_bytes()))).expect("decodes");
        let again = serializer.decode(&serializer.encode_message(&message).expect("encodes")).expect("decodes");
        assert_eq!(again, message, "{} round trip", serializer.name());

        let reply = Reply {
            join_ref: message.join_ref.clone(),
            msg_ref: message.msg_ref.clone(),
            topic: message.topic.clone(),
            status: ReplyStatus::Ok,
            response: message.payload.clone(),
        };
        let echoed = serializer.encode_reply(&reply).expect("encodes");
        let echoed = String::from_utf8_lossy(echoed.as_bytes());
        assert!(echoed.contains("1.0777777777777781e+111"), "{} echo: {echoed}", serializer.name());
    }
}
