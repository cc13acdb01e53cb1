//! A minimal interactive client: each line typed on stdin is sent as a text
//! frame; every frame received is printed. For trying switchyard by hand:
//!
//! ```text
//! cargo run --example ws-client -- "ws://127.0.0.1:8000/ws?token=$TOKEN"
//! {"type":"subscribe","channel":"prices.BTC-USDT"}
//! ```
//!
//! It exits when the connection ends (server close or error) or stdin does.

use std::io::BufRead;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Some(url) = std::env::args().nth(1) else {
        eprintln!("usage: ws-client ws://HOST:PORT/ws?token=JWT");
        std::process::exit(2);
    };
    let (ws, _) = match tokio_tungstenite::connect_async(url.as_str()).await {
        Ok(pair) => pair,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            eprintln!("refused: {} {body}", resp.status());
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!("cannot connect: {e}");
            std::process::exit(1);
        }
    };
    let (mut tx, mut rx) = ws.split();
    // Stdin is read on a thread of its own: a blocking read must not keep the
    // process alive once the connection has ended.
    let (line_tx, mut lines) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if line_tx.blocking_send(line).is_err() {
                return;
            }
        }
    });
    loop {
        tokio::select! {
            line = lines.recv() => match line {
                Some(line) if !line.trim().is_empty() => {
                    if tx.send(Message::text(line)).await.is_err() {
                        break;
                    }
                }
                Some(_) => {}
                None => break,
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Text(t))) => println!("{t}"),
                Some(Ok(Message::Close(frame))) => {
                    println!("closed: {frame:?}");
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    eprintln!("error: {e}");
                    break;
                }
                None => break,
            },
        }
    }
}
