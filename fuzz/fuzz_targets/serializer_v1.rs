//! V1 JSON text frames from a client (`vsn=1.0.0`): decoding never panics, and a decoded message
//! encodes and decodes back to itself.
#![no_main]

use bytes::Bytes;
use fawkes_serializer::{Frame, Serializer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Frame::Text(Bytes::copy_from_slice(data));
    let _ = Serializer::V1.decode_server(&frame);
    if let Ok(message) = Serializer::V1.decode(&frame) {
        if let Ok(encoded) = Serializer::V1.encode_message(&message) {
            let again = Serializer::V1.decode(&encoded).expect("an encoded message decodes");
            assert_eq!(again, message, "V1 round trip");
        }
    }
});
