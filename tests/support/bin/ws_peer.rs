//! WebSocket peer for end-to-end tests (a real WebSocket implementation,
//! tokio-tungstenite, on both ends of the agent).
//!
//! `ws-peer server PORT [GREETING]`: echo server on [::]:PORT. With GREETING,
//! the handshake is answered by hand so that the 101 and a first text frame
//! leave in one write (one segment).
//! `ws-peer client URL COUNT [GREETING]`: sends COUNT messages and checks the
//! echoes (and the greeting first); prints one JSON line. With
//! `WS_PEER_INTERVAL_MS` set, waits that long between messages (a session
//! that lasts) and prints `{"kind":"started"}` after the first echo.

use anyhow::{bail, ensure, Context, Result};
use futures_util::{SinkExt, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_tungstenite::{
    tungstenite::{handshake::derive_accept_key, protocol::Role, Message},
    WebSocketStream,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("server") => server(args[2].parse()?, args.get(3).cloned()).await,
        Some("client") => client(&args[2], args[3].parse()?, args.get(4).cloned()).await,
        _ => bail!("usage: ws-peer server PORT [GREETING] | ws-peer client URL COUNT [GREETING]"),
    }
}

async fn server(port: u16, greeting: Option<String>) -> Result<()> {
    let listener = TcpListener::bind(("::", port)).await?;
    println!("{{\"kind\":\"ready\"}}");
    loop {
        let (stream, _) = listener.accept().await?;
        let greeting = greeting.clone();
        tokio::spawn(async move {
            let result = match greeting {
                None => echo(tokio_tungstenite::accept_async(stream).await?).await,
                Some(greeting) => echo(handshake_with_greeting(stream, &greeting).await?).await,
            };
            if let Err(error) = &result {
                eprintln!("ws-peer server: {error:#}");
            }
            anyhow::Ok(())
        });
    }
}

async fn handshake_with_greeting(mut stream: TcpStream, greeting: &str) -> Result<WebSocketStream<TcpStream>> {
    let mut request = Vec::new();
    while !request.ends_with(b"\r\n\r\n") {
        ensure!(request.len() < 16 * 1024, "handshake request too long");
        let byte = stream.read_u8().await?;
        request.push(byte);
    }
    let request = String::from_utf8(request)?;
    let key = request
        .lines()
        .find_map(|line| line.split_once(':').filter(|(name, _)| name.eq_ignore_ascii_case("sec-websocket-key")))
        .map(|(_, value)| value.trim().to_owned())
        .context("no Sec-WebSocket-Key")?;
    let mut reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
    .into_bytes();
    ensure!(greeting.len() < 126, "greeting must fit a short frame");
    reply.extend([0x81, greeting.len() as u8]); // FIN + text, unmasked (server to client)
    reply.extend(greeting.as_bytes());
    stream.write_all(&reply).await?;
    Ok(WebSocketStream::from_raw_socket(stream, Role::Server, None).await)
}

async fn echo(mut socket: WebSocketStream<TcpStream>) -> Result<()> {
    while let Some(message) = socket.next().await {
        match message? {
            message @ (Message::Text(_) | Message::Binary(_)) => socket.send(message).await?,
            Message::Close(_) => break,
            _ => {}
        }
    }
    Ok(())
}

async fn client(url: &str, count: usize, greeting: Option<String>) -> Result<()> {
    let (mut socket, response) = tokio_tungstenite::connect_async(url).await.context("WebSocket connect")?;
    ensure!(response.status() == 101, "status {}", response.status());
    let mut received_greeting = None;
    if greeting.is_some() {
        match socket.next().await.context("closed before the greeting")?? {
            Message::Text(text) => received_greeting = Some(text.to_string()),
            other => bail!("expected the greeting, got {other:?}"),
        }
    }
    let interval = std::env::var("WS_PEER_INTERVAL_MS").ok().map(|ms| ms.parse()).transpose()?;
    for i in 0..count {
        let sent = format!("message {i} {}", "x".repeat(i * 100));
        socket.send(Message::text(sent.clone())).await?;
        match socket.next().await.context("closed before the echo")?? {
            Message::Text(text) if text.as_str() == sent => {}
            other => bail!("echo {i} differs: {other:?}"),
        }
        if let Some(interval) = interval {
            if i == 0 {
                println!("{{\"kind\":\"started\"}}");
            }
            tokio::time::sleep(std::time::Duration::from_millis(interval)).await;
        }
    }
    socket.close(None).await?;
    println!("{}", serde_json::json!({ "echoed": count, "greeting": received_greeting }));
    Ok(())
}
