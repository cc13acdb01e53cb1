//! JSON bodies for the requests hyper refuses before they reach the router.
//!
//! hyper answers a request it cannot parse (an invalid URI such as one with `>`, a
//! bad header, an oversized head) by itself, with an empty body, and offers no hook
//! for it. This wrapper around the connection's socket recognises those automatic
//! responses, the only ones the node sends with `content-length: 0`, and writes
//! the documented `{error, code}` body in their place.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A socket whose bare parse-error responses get a JSON body.
pub struct JsonParseErrors<T> {
    inner: T,
    /// The replacement response being written, and how much of it is out.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> JsonParseErrors<T> {
    /// Wraps a freshly accepted socket.
    pub fn new(inner: T) -> Self {
        JsonParseErrors {
            inner,
            pending: None,
        }
    }

    /// The socket, for an upgraded connection that speaks WebSocket from now on.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

/// The replacement for one of hyper's automatic responses, if `buf` is one.
fn replacement(buf: &[u8]) -> Option<Vec<u8>> {
    let head = buf.strip_prefix(b"HTTP/1.1 ")?;
    if !buf.ends_with(b"\r\n\r\n") || !contains(buf, b"\r\ncontent-length: 0\r\n") {
        return None;
    }
    let (status, why) = match head.get(..3)? {
        b"400" => (
            "400 Bad Request",
            "bad request: the request line or a header is not valid HTTP (e.g. an unencoded character in the path)",
        ),
        b"414" => ("414 URI Too Long", "the request URI is too long"),
        b"431" => (
            "431 Request Header Fields Too Large",
            "the request headers are too large",
        ),
        _ => return None,
    };
    let code = &status[..3];
    let body = format!(r#"{{"error":"{why}","code":{code}}}"#);
    Some(
        format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl<T: AsyncRead + Unpin> AsyncRead for JsonParseErrors<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for JsonParseErrors<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            match replacement(buf) {
                Some(bytes) => this.pending = Some((bytes, 0)),
                None => return Pin::new(&mut this.inner).poll_write(cx, buf),
            }
        }
        if let Some((bytes, written)) = &mut this.pending {
            while *written < bytes.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &bytes[*written..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *written += n;
            }
        }
        this.pending = None;
        // hyper sees its own response as written.
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    // Not vectored: hyper then writes each response head in one buffer, which is
    // what `replacement` looks at.
    fn is_write_vectored(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::replacement;

    #[test]
    fn only_bare_error_heads_are_replaced() {
        let bare = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 10:00:00 GMT\r\n\r\n";
        let json = String::from_utf8(replacement(bare).unwrap()).unwrap();
        assert!(json.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let body = json.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], 400);
        assert!(json.contains(&format!("content-length: {}\r\n", body.len())));
        let ours = b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 27\r\n\r\n{\"error\":\"x\",\"code\":104}";
        assert!(replacement(ours).is_none());
        assert!(replacement(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(replacement(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_none());
    }
}
