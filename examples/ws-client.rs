//! A minimal interactive client: each line typed on stdin is sent as a text
//! frame; every frame received is printed. For trying switchyard by hand:
//!
//! ```text
//! cargo run --example ws-client -- "ws://127.0.0.1:8000/ws?token=$TOKEN"
//! {"type":"subscribe","channel":"prices.BTC-USDT"}
//! ```

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, BufReader};
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
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    loop {
        tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) if !line.trim().is_empty() => {
                    if tx.send(Message::text(line)).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
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
