/// Why a frame could not be decoded. Every variant is the peer's bad input, never a bug of ours:
/// the session answers it by closing that one socket (Phoenix closes with code 1011).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The text is not JSON.
    #[error("invalid JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The JSON is not a message: not an array of five (V2) or an object with the message keys
    /// (V1), or a field has the wrong type.
    #[error("malformed message: {0}")]
    Shape(#[source] serde_json::Error),
    /// A binary frame is shorter than its header says.
    #[error("binary frame of {len} bytes is shorter than its header requires ({needed})")]
    BinaryTooShort {
        /// The frame's length.
        len: usize,
        /// The length its header implies.
        needed: usize,
    },
    /// A binary frame of a kind this side does not accept.
    #[error("unexpected binary message kind {0}")]
    UnexpectedBinaryKind(u8),
    /// A string field of a binary frame is not UTF-8.
    #[error("binary frame field `{0}` is not UTF-8")]
    BinaryFieldNotUtf8(&'static str),
    /// The serializer in use has no binary form (V1).
    #[error("the {0} serializer does not accept binary frames")]
    BinaryNotSupported(&'static str),
}

impl DecodeError {
    pub(crate) fn from_json(e: serde_json::Error) -> DecodeError {
        if e.is_syntax() || e.is_eof() { DecodeError::Json(e) } else { DecodeError::Shape(e) }
    }
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// A string field of a binary frame is longer than the 255 bytes its length byte can say.
    #[error("`{field}` is {len} bytes; a binary frame allows at most 255")]
    FieldTooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
    },
}
