//! The load generator's WebSocket client for the receive path: a hand-rolled
//! RFC 6455 reader over one reusable buffer, so a delivery costs a frame-header
//! parse and two short byte scans — no allocation, no UTF-8 check, no JSON parse.
//! (tungstenite allocates every message; at 2 M deliveries/s that cost alone
//! saturated the old generator before the server.) Handshakes and the few frames
//! the client sends are rare and simple.

use std::net::SocketAddr;
use std::ops::Range;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const TEXT: u8 = 1;
pub const BINARY: u8 = 2;
const CLOSE: u8 = 8;
const PING: u8 = 9;
const PONG: u8 = 10;

/// One client connection.
pub struct RawWs {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl RawWs {
    /// Connects and upgrades `GET path` (which may carry the token in its query).
    pub async fn connect(addr: SocketAddr, path: &str) -> std::io::Result<RawWs> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        // The key's value does not matter to the server; the accept is not checked.
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut ws = RawWs {
            stream,
            buf: vec![0; 64 << 10],
            start: 0,
            end: 0,
        };
        loop {
            if let Some(head) = find(&ws.buf[..ws.end], b"\r\n\r\n") {
                if !ws.buf.starts_with(b"HTTP/1.1 101") {
                    let text = String::from_utf8_lossy(&ws.buf[..head]).to_string();
                    return Err(std::io::Error::other(format!("upgrade refused: {text}")));
                }
                ws.start = head + 4;
                return Ok(ws);
            }
            if ws.fill().await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Sends one masked frame (clients must mask).
    pub async fn send(&mut self, opcode: u8, payload: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(payload.len() + 14);
        frame.push(0x80 | opcode);
        match payload.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= u16::MAX as usize => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let key = fastrand::u32(..).to_be_bytes();
        frame.extend_from_slice(&key);
        frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        self.stream.write_all(&frame).await
    }

    /// The next data frame: its opcode and where its payload sits in [`RawWs::payload`]'s
    /// buffer (valid until the next call). Pings are answered; `None` at close or EOF.
    pub async fn next(&mut self) -> Option<(u8, Range<usize>)> {
        loop {
            if let Some((opcode, head, len)) = header(&self.buf[self.start..self.end]) {
                if self.end - self.start >= head + len {
                    let payload = self.start + head..self.start + head + len;
                    self.start += head + len;
                    match opcode {
                        TEXT | BINARY | 0 => return Some((opcode, payload)),
                        PING => {
                            let body = self.buf[payload].to_vec();
                            self.send(PONG, &body).await.ok()?;
                        }
                        CLOSE => return None,
                        _ => {}
                    }
                    continue;
                }
                if head + len > self.buf.len() {
                    self.buf.resize(head + len, 0);
                }
            }
            if self.fill().await.ok()? == 0 {
                return None;
            }
        }
    }

    /// The bytes of a range [`RawWs::next`] returned.
    pub fn payload(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }

    /// Reads more, first moving what is unparsed to the front when the end is reached.
    async fn fill(&mut self) -> std::io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.stream.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

/// A server frame's (opcode, header length, payload length), once the header is in.
fn header(b: &[u8]) -> Option<(u8, usize, usize)> {
    if b.len() < 2 {
        return None;
    }
    let opcode = b[0] & 0x0f;
    match b[1] & 0x7f {
        126 if b.len() >= 4 => Some((opcode, 4, u16::from_be_bytes([b[2], b[3]]) as usize)),
        127 if b.len() >= 10 => {
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            Some((opcode, 10, u64::from_be_bytes(n) as usize))
        }
        126 | 127 => None,
        n => Some((opcode, 2, n as usize)),
    }
}

/// The first position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}

/// The decimal number right after `key` in `text`.
pub fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = find(text, key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(n)
}
