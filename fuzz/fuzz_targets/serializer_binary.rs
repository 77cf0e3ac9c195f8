//! V2 binary frames (kind, field lengths, fields, raw payload): decoding a client's push or a
//! server's message never panics, and a decoded push encodes and decodes back to itself.
#![no_main]

use bytes::Bytes;
use fawkes_serializer::{Frame, Serializer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Frame::Binary(Bytes::copy_from_slice(data));
    let _ = Serializer::V2.decode_server(&frame);
    let _ = Serializer::V1.decode(&frame);
    if let Ok(message) = Serializer::V2.decode(&frame) {
        if let Ok(encoded) = Serializer::V2.encode_message(&message) {
            let again = Serializer::V2.decode(&encoded).expect("an encoded message decodes");
            assert_eq!(again, message, "binary round trip");
        }
    }
});
