//! gRPC on the wire, as every layer that answers or reads it needs it:
//! recognising a gRPC message by its content type, reading a
//! `grpc-status`, and encoding `grpc-message`.

use http::{HeaderMap, HeaderValue};

/// Whether `headers` are those of a gRPC request or response: a content type
/// of `application/grpc`, with or without a suffix (`application/grpc+proto`,
/// `application/grpc-web+proto`, parameters after `;`), in any case (media
/// types are case-insensitive). `application/grpcx` is not gRPC.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(is_grpc_content_type)
}

/// Whether `content_type` (a `content-type` header's value) is gRPC's, as
/// [`is_grpc`] decides: for a caller that holds the value already, without
/// a second lookup.
pub fn is_grpc_content_type(content_type: &HeaderValue) -> bool {
    const GRPC: &[u8; 16] = b"application/grpc";
    let ct = content_type.as_bytes();
    // The exact bytes first (what every client sends): one comparison of
    // 16 bytes, not a case-folding loop.
    ct.get(..16)
        .is_some_and(|p| p == GRPC || p.eq_ignore_ascii_case(GRPC))
        && matches!(ct.get(16), None | Some(b'+' | b'-' | b';'))
}

/// The code a `grpc-status` value holds (0 to 16, written without leading
/// zeros), or `None` when it holds none.
///
/// ```
/// use atscale_core::grpc::status_code;
///
/// assert_eq!(status_code(b"14"), Some(14));
/// assert_eq!(status_code(b"17"), None);
/// assert_eq!(status_code(b"014"), None);
/// ```
pub fn status_code(value: &[u8]) -> Option<u8> {
    let code = match *value {
        [d] if d.is_ascii_digit() => d - b'0',
        [b'1', d] if d.is_ascii_digit() => 10 + d - b'0',
        _ => return None,
    };
    (code <= 16).then_some(code)
}

/// Percent-encodes a `grpc-message` as the gRPC HTTP/2 spec asks: every
/// byte outside visible ASCII, and `%` itself.
pub fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_status_codes_are_0_to_16() {
        for code in 0..=16u8 {
            assert_eq!(status_code(code.to_string().as_bytes()), Some(code));
        }
        for bad in ["17", "20", "01", "", "-1", "1a", "100", "a"] {
            assert_eq!(status_code(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_is_recognised_by_content_type() {
        for (ct, grpc) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("Application/GRPC", true),
            ("application/grpc-web", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpcx", false),
            ("application/json", false),
            ("application/grp", false),
        ] {
            let mut headers = HeaderMap::new();
            let value = HeaderValue::from_static(ct);
            assert_eq!(is_grpc_content_type(&value), grpc, "{ct}");
            headers.insert(http::header::CONTENT_TYPE, value);
            assert_eq!(is_grpc(&headers), grpc, "{ct}");
        }
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode("retry after 2 s."), "retry after 2 s.");
        assert_eq!(percent_encode("100% ça\n"), "100%25 %C3%A7a%0A");
        assert_eq!(percent_encode("1.5\u{b5}s 100%"), "1.5%C2%B5s 100%25");
    }
}
