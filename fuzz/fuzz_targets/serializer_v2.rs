//! V2 JSON text frames from a client (`vsn=2.0.0`), on a transport with binary frames and on a
//! text-only one: decoding never panics, and a decoded message encodes and decodes back to itself.
#![no_main]

use bytes::Bytes;
use fawkes_serializer::{Frame, Serializer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frame = Frame::Text(Bytes::copy_from_slice(data));
    let _ = Serializer::V2.decode_server(&frame);
    for serializer in [Serializer::V2, Serializer::V2Text] {
        if let Ok(message) = serializer.decode(&frame) {
            if let Ok(encoded) = serializer.encode_message(&message) {
                let again = serializer.decode(&encoded).expect("an encoded message decodes");
                assert_eq!(again, message, "{} round trip", serializer.name());
            }
        }
    }
});
