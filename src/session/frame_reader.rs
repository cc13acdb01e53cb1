//! Reads client WebSocket frames (RFC 6455 §5) with a buffer that is empty while
//! the connection is idle.
//!
//! fastwebsockets (still used for the upgrade and for encoding server frames)
//! gives every connection a fixed 8 KiB read buffer; measured with `make bench`
//! that is more than half of an idle connection's memory. This reader grows its
//! buffer only for a frame in flight and gives it back once the frame is taken.
//! It also parses a frame only once all of it is buffered, so `read_frame` is
//! cancel-safe.

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frame opcodes a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

/// One unmasked client frame.
#[derive(Debug)]
pub struct Frame {
    pub fin: bool,
    pub opcode: OpCode,
    pub payload: Bytes,
}

/// Why no frame could be read.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadError {
    /// The peer closed the connection or the socket failed.
    Closed,
    /// The frame is larger than the limit; its payload was not read.
    TooLarge,
    /// The bytes are not a valid client frame.
    Protocol(&'static str),
}

/// Longest frame header: 2 bytes, 8 of extended length, 4 of mask.
const MAX_HEADER: usize = 14;
/// Largest payload of a control frame.
const MAX_CONTROL_PAYLOAD: usize = 125;

/// Reads frames from the client half of a connection.
pub struct FrameReader<R> {
    io: R,
    buf: BytesMut,
    max_frame: usize,
}

struct Header {
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    header_len: usize,
    payload_len: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader refusing frames with payloads over `max_frame` bytes.
    pub fn new(io: R, max_frame: usize) -> Self {
        FrameReader {
            io,
            buf: BytesMut::new(),
            max_frame,
        }
    }

    /// The next frame. Cancel-safe: bytes read so far stay buffered.
    pub async fn read_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            if let Some(header) = self.parse_header()? {
                let total = header.header_len + header.payload_len;
                if self.buf.len() >= total {
                    return Ok(self.take_frame(header));
                }
                self.buf.reserve(total - self.buf.len());
            } else {
                self.buf.reserve(MAX_HEADER);
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Err(ReadError::Closed),
                Ok(_) => {}
            }
        }
    }

    /// Parses the header if enough bytes are buffered; consumes nothing.
    fn parse_header(&self) -> Result<Option<Header>, ReadError> {
        let b = &self.buf[..];
        if b.len() < 2 {
            return Ok(None);
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Err(ReadError::Protocol(
                "reserved bits set (no extension was negotiated)",
            ));
        }
        let opcode = match b[0] & 0x0f {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return Err(ReadError::Protocol("unknown opcode")),
        };
        if b[1] & 0x80 == 0 {
            return Err(ReadError::Protocol("client frames must be masked"));
        }
        let (len_bytes, short) = match b[1] & 0x7f {
            126 => (2, None),
            127 => (8, None),
            n => (0, Some(usize::from(n))),
        };
        let header_len = 2 + len_bytes + 4;
        if b.len() < header_len {
            return Ok(None);
        }
        let payload_len = match short {
            Some(n) => n,
            None if len_bytes == 2 => usize::from(u16::from_be_bytes([b[2], b[3]])),
            None => {
                let mut be = [0u8; 8];
                be.copy_from_slice(&b[2..10]);
                usize::try_from(u64::from_be_bytes(be)).map_err(|_| ReadError::TooLarge)?
            }
        };
        let is_control = matches!(opcode, OpCode::Close | OpCode::Ping | OpCode::Pong);
        if is_control && (!fin || payload_len > MAX_CONTROL_PAYLOAD) {
            return Err(ReadError::Protocol(
                "control frames must be unfragmented and at most 125 bytes",
            ));
        }
        if payload_len > self.max_frame {
            return Err(ReadError::TooLarge);
        }
        let mut mask = [0u8; 4];
        mask.copy_from_slice(&b[header_len - 4..header_len]);
        Ok(Some(Header {
            fin,
            opcode,
            mask,
            header_len,
            payload_len,
        }))
    }

    fn take_frame(&mut self, h: Header) -> Frame {
        self.buf.advance(h.header_len);
        let mut payload = self.buf.split_to(h.payload_len);
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= h.mask[i & 3];
        }
        if self.buf.is_empty() {
            // Nothing of the next frame is buffered: an idle connection holds no buffer.
            self.buf = BytesMut::new();
        }
        Frame {
            fin: h.fin,
            opcode: h.opcode,
            payload: payload.freeze(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::ReadBuf;

    /// Encodes a masked client frame.
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n < 65536 => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    /// Yields its bytes a few at a time, like a slow network.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let n = self
                .step
                .min(self.data.len() - self.pos)
                .min(buf.remaining());
            let start = self.pos;
            buf.put_slice(&self.data[start..start + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    fn reader(data: Vec<u8>, step: usize, max: usize) -> FrameReader<Trickle> {
        FrameReader::new(Trickle { data, pos: 0, step }, max)
    }

    #[tokio::test]
    async fn reads_frames_of_every_length_form_across_partial_reads() {
        let big = vec![b'x'; 70_000];
        let mid = vec![b'y'; 300];
        let mut data = client_frame(0x81, b"{\"type\":\"ping\"}");
        data.extend(client_frame(0x81, &mid));
        data.extend(client_frame(0x82, &big));
        data.extend(client_frame(0x89, b"hb"));
        for step in [1, 3, 7, 4096] {
            let mut r = reader(data.clone(), step, 1 << 20);
            let f = r.read_frame().await.unwrap();
            assert_eq!(
                (f.fin, f.opcode, &f.payload[..]),
                (true, OpCode::Text, &b"{\"type\":\"ping\"}"[..])
            );
            assert_eq!(&r.read_frame().await.unwrap().payload[..], &mid[..]);
            let f = r.read_frame().await.unwrap();
            assert_eq!((f.opcode, f.payload.len()), (OpCode::Binary, big.len()));
            assert_eq!(r.read_frame().await.unwrap().opcode, OpCode::Ping);
            assert_eq!(r.read_frame().await.unwrap_err(), ReadError::Closed);
        }
    }

    #[tokio::test]
    async fn buffer_is_released_between_frames() {
        let mut r = reader(client_frame(0x81, b"hello"), 4096, 1024);
        r.read_frame().await.unwrap();
        assert_eq!(r.buf.capacity(), 0, "an idle reader holds no buffer");
    }

    #[tokio::test]
    async fn invalid_frames_are_protocol_errors() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let rsv = client_frame(0xC1, b"x");
        let opcode = client_frame(0x83, b"x");
        let long_ping = client_frame(0x89, &[0u8; 126]);
        let fragmented_close = client_frame(0x08, b"");
        for data in [unmasked, rsv, opcode, long_ping, fragmented_close] {
            let err = reader(data, 4096, 1024).read_frame().await.unwrap_err();
            assert!(matches!(err, ReadError::Protocol(_)), "{err:?}");
        }
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_from_its_header() {
        // Only the header is supplied: the limit must trip without the payload.
        let mut header = client_frame(0x81, &vec![0u8; 2000]);
        header.truncate(8);
        let err = reader(header, 4096, 1024).read_frame().await.unwrap_err();
        assert_eq!(err, ReadError::TooLarge);
    }

    #[tokio::test]
    async fn a_dropped_read_loses_nothing() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut r = FrameReader::new(server, 1024);
        let frame = client_frame(0x81, b"cancel-safe");
        use tokio::io::AsyncWriteExt;
        client.write_all(&frame[..5]).await.unwrap();
        // Poll a read once: it buffers the partial frame and is then dropped.
        use futures_util::FutureExt;
        assert!(
            r.read_frame().now_or_never().is_none(),
            "incomplete frame: still waiting"
        );
        client.write_all(&frame[5..]).await.unwrap();
        let f = r.read_frame().await.unwrap();
        assert_eq!(&f.payload[..], b"cancel-safe");
    }
}
