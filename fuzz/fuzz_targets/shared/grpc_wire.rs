//! The gRPC wire for the targets that drive a gRPC listener's stack (`grpc_api`,
//! `replication_api`): a message framed as a client sends it, and the status of an answer.

/// A gRPC frame: uncompressed, its length (one too many with `wrong_length`, so that the
/// body ends before the message does), the message.
pub fn frame(message: &[u8], wrong_length: bool) -> Vec<u8> {
    let length = u32::try_from(message.len()).unwrap_or(u32::MAX).wrapping_add(u32::from(wrong_length));
    let mut frame = Vec::with_capacity(message.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// The answer's gRPC status code: in the headers (an answer with no message) or the trailers.
pub fn status(headers: &http::HeaderMap, trailers: Option<&http::HeaderMap>) -> Option<i32> {
    let code = |map: &http::HeaderMap| map.get("grpc-status")?.to_str().ok()?.parse().ok();
    code(headers).or_else(|| trailers.and_then(code))
}
