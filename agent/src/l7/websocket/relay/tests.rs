use std::sync::{Arc, Mutex};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    task::JoinHandle,
    time::sleep,
};

use super::*;
use crate::l7::websocket::{
    frame::{BINARY, CLOSE, CONTINUATION, INVALID_DATA, PING, POLICY_VIOLATION, PROTOCOL_ERROR, TEXT, TOO_BIG},
    testing::{client_frame, compressed_frame, frames, read_frame, Deflater, Frame},
};

/// Allows every message but those saying "deny"; replaces PLACEHOLDER as a
/// credential rewrite would. Remembers what it saw.
struct TestInspector {
    seen: Arc<Mutex<Vec<String>>>,
}

const DENIAL: &str = "WEBSOCKET_TEXT /ws not permitted by policy";

impl Inspector for TestInspector {
    fn text(&mut self, message: &str) -> TextVerdict {
        self.seen.lock().unwrap().push(message.to_owned());
        if message.contains("deny") {
            return TextVerdict::Close { code: POLICY_VIOLATION, reason: DENIAL.into() };
        }
        TextVerdict::Forward(message.replace("PLACEHOLDER", "secret"))
    }
}

/// A relay between two in-memory connections: the test plays the client
/// and the origin.
struct Session {
    client: DuplexStream,
    origin: DuplexStream,
    reload: watch::Sender<u64>,
    relay: JoinHandle<Outcome>,
    seen: Arc<Mutex<Vec<String>>>,
}

struct Setup {
    deflate: Option<Deflate>,
    limits: Limits,
    prefill: Prefill,
    idle: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Self { deflate: None, limits: Limits::default(), prefill: Prefill::default(), idle: Duration::from_secs(3600) }
    }
}

impl Setup {
    fn start(self) -> Session {
        let (client, client_agent) = tokio::io::duplex(256 * 1024);
        let (origin_agent, origin) = tokio::io::duplex(256 * 1024);
        let (reload, reload_receiver) = watch::channel(0);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut inspector = TestInspector { seen: seen.clone() };
        let relay = tokio::spawn(async move {
            let Setup { deflate, limits, prefill, idle } = self;
            relay(client_agent, origin_agent, prefill, deflate, &mut inspector, reload_receiver, limits, idle).await
        });
        Session { client, origin, reload, relay, seen }
    }
}

fn start() -> Session {
    Setup::default().start()
}

/// Long enough for any relay here, paused time included.
const PATIENCE: Duration = Duration::from_secs(1000);

/// Everything until the end of `stream`, bounded in time.
async fn rest_of(stream: &mut DuplexStream) -> Vec<u8> {
    let mut rest = Vec::new();
    timeout(PATIENCE, stream.read_to_end(&mut rest)).await.expect("the stream ends").expect("read");
    rest
}

async fn outcome(relay: JoinHandle<Outcome>) -> Outcome {
    timeout(PATIENCE, relay).await.expect("the relay ends").expect("the relay did not panic")
}

fn close(code: u16, reason: &str) -> Close {
    Close { code, reason: reason.into() }
}

#[tokio::test]
async fn text_is_inspected_and_forwarded_whole_binary_and_control_frames_as_they_come() {
    let Session { mut client, mut origin, relay, seen, reload: _reload } = start();
    let input = [
        client_frame(false, TEXT, b"hel"),
        client_frame(true, PING, b"?"),
        client_frame(true, CONTINUATION, b"lo"),
        client_frame(false, BINARY, b"\x00\x01"),
        client_frame(true, CONTINUATION, b"\x02"),
    ]
    .concat();
    client.write_all(&input).await.unwrap();
    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(read_frame(&mut origin).await);
    }
    let summary: Vec<(bool, u8, &[u8])> =
        received.iter().map(|frame| (frame.fin, frame.opcode, &frame.payload[..])).collect();
    assert_eq!(
        summary,
        [(true, PING, &b"?"[..]), (true, TEXT, b"hello"), (false, BINARY, b"\x00\x01"), (true, CONTINUATION, b"\x02")]
    );
    assert!(received.iter().all(|frame| frame.masked && frame.rsv == 0));
    assert_eq!(*seen.lock().unwrap(), ["hello"]);

    // The origin's bytes reach the client as they are, whatever they hold.
    let from_origin = [&b"\x81\x02hi\xC1\x03abc\x02\x7E\x00"[..], &[0x55; 0x80], b"\x89\x00"].concat();
    origin.write_all(&from_origin).await.unwrap();
    let mut at_client = vec![0u8; from_origin.len()];
    client.read_exact(&mut at_client).await.unwrap();
    assert_eq!(at_client, from_origin);

    // A close handshake ends it normally.
    client.write_all(&client_frame(true, CLOSE, &1000u16.to_be_bytes())).await.unwrap();
    assert_eq!(read_frame(&mut origin).await.close(), (1000, ""));
    let origin_close = [0x88, 0x02, 0x03, 0xE8];
    origin.write_all(&origin_close).await.unwrap();
    drop(origin);
    assert_eq!(rest_of(&mut client).await, origin_close);
    drop(client);
    let outcome = outcome(relay).await;
    assert_eq!(outcome.ended, Ended::Closed);
    assert!(outcome.relayed.error.is_none(), "{:?}", outcome.relayed.error);
    let sent_up: usize = received.iter().map(|frame| 6 + frame.payload.len()).sum::<usize>() + 8;
    assert_eq!(outcome.relayed.bytes_up, sent_up as u64);
    assert_eq!(outcome.relayed.bytes_down, (from_origin.len() + origin_close.len()) as u64);
}

#[tokio::test]
async fn the_inspector_may_rewrite_a_message() {
    let Session { mut client, mut origin, seen, reload: _reload, .. } = start();
    client.write_all(&client_frame(true, TEXT, br#"{"token":"PLACEHOLDER"}"#)).await.unwrap();
    assert_eq!(read_frame(&mut origin).await.text(), r#"{"token":"secret"}"#);
    assert_eq!(*seen.lock().unwrap(), [r#"{"token":"PLACEHOLDER"}"#]);
}

/// The close the client and the origin each get, and nothing else.
async fn closes_at_both_ends(client: &mut DuplexStream, origin: &mut DuplexStream) -> (Vec<Frame>, Vec<Frame>) {
    let (at_origin, at_client) = tokio::join!(rest_of(origin), rest_of(client));
    (frames(&at_client), frames(&at_origin))
}

#[tokio::test]
async fn a_refused_message_never_reaches_the_origin_and_both_sides_get_the_inspectors_close() {
    let Session { mut client, mut origin, relay, seen, reload: _reload } = start();
    client.write_all(&client_frame(true, TEXT, b"first")).await.unwrap();
    assert_eq!(read_frame(&mut origin).await.text(), "first");
    client
        .write_all(&[client_frame(true, TEXT, b"please deny this"), client_frame(true, TEXT, b"after")].concat())
        .await
        .unwrap();
    let (at_client, at_origin) = closes_at_both_ends(&mut client, &mut origin).await;
    assert_eq!(at_origin.len(), 1, "only the close: {at_origin:?}");
    assert!(at_origin[0].masked);
    assert_eq!(at_origin[0].close(), (POLICY_VIOLATION, DENIAL));
    assert_eq!(at_client.len(), 1, "{at_client:?}");
    assert!(!at_client[0].masked);
    assert_eq!(at_client[0].close(), (POLICY_VIOLATION, DENIAL));
    drop((client, origin));
    let outcome = outcome(relay).await;
    assert_eq!(outcome.ended, Ended::Policy(close(POLICY_VIOLATION, DENIAL)));
    assert!(outcome.relayed.error.is_none());
    assert_eq!(*seen.lock().unwrap(), ["first", "please deny this"]);
}

#[tokio::test]
async fn a_new_policy_generation_closes_both_sides_with_1012() {
    let Session { mut client, mut origin, relay, reload, .. } = start();
    client.write_all(&client_frame(true, TEXT, b"before")).await.unwrap();
    assert_eq!(read_frame(&mut origin).await.text(), "before");
    reload.send(1).unwrap();
    let (at_client, at_origin) = closes_at_both_ends(&mut client, &mut origin).await;
    assert_eq!(at_client.iter().map(Frame::close).collect::<Vec<_>>(), [(1012, "policy reloaded")]);
    assert_eq!(at_origin.iter().map(Frame::close).collect::<Vec<_>>(), [(1012, "policy reloaded")]);
    drop((client, origin));
    assert_eq!(outcome(relay).await.ended, Ended::Reload);
}

#[tokio::test]
async fn rule_breaches_close_both_sides_with_their_code() {
    let limits = Limits { max_text: 10, ..Limits::default() };
    for (input, expected) in [
        (vec![0x81, 0x02, b'h', b'i'], close(PROTOCOL_ERROR, "unmasked client frame")),
        (client_frame(true, TEXT, b"\xC3\x28"), close(INVALID_DATA, "text message is not UTF-8")),
        (client_frame(true, TEXT, b"eleven byte"), close(TOO_BIG, "message over 10 bytes")),
        (client_frame(true, CONTINUATION, b""), close(PROTOCOL_ERROR, "continuation frame without a message")),
    ] {
        let Session { mut client, mut origin, relay, reload: _reload, .. } =
            Setup { limits: limits.clone(), ..Setup::default() }.start();
        client.write_all(&input).await.unwrap();
        let (at_client, at_origin) = closes_at_both_ends(&mut client, &mut origin).await;
        let expected_frame = (expected.code, expected.reason.as_str());
        assert_eq!(at_client.iter().map(Frame::close).collect::<Vec<_>>(), [expected_frame], "{input:02x?}");
        assert_eq!(at_origin.iter().map(Frame::close).collect::<Vec<_>>(), [expected_frame], "{input:02x?}");
        drop((client, origin));
        assert_eq!(outcome(relay).await.ended, Ended::Refused(expected));
    }
}

#[tokio::test]
async fn the_relays_close_waits_for_the_end_of_the_origins_frame_in_flight() {
    let Session { mut client, mut origin, relay, reload: _reload, .. } = start();
    let server_frame = [&[0x82, 0x7E, 0x01, 0x00][..], &[7; 256]].concat();
    origin.write_all(&server_frame[..100]).await.unwrap();
    let mut first = vec![0u8; 100];
    client.read_exact(&mut first).await.unwrap();
    client.write_all(&client_frame(true, TEXT, b"deny")).await.unwrap();
    assert_eq!(read_frame(&mut origin).await.close(), (POLICY_VIOLATION, DENIAL));
    origin.write_all(&server_frame[100..]).await.unwrap();
    origin.write_all(b"\x81\x05later").await.unwrap();
    let rest = rest_of(&mut client).await;
    assert_eq!(rest[..160], server_frame[100..], "the origin's frame whole");
    assert_eq!(frames(&rest[160..]).iter().map(Frame::close).collect::<Vec<_>>(), [(POLICY_VIOLATION, DENIAL)]);
    drop((client, origin));
    let outcome = outcome(relay).await;
    assert_eq!(outcome.relayed.bytes_down, (server_frame.len() + 2 + 2 + DENIAL.len()) as u64);
}

#[tokio::test]
async fn a_client_the_origin_sent_its_close_gets_no_other() {
    let Session { mut client, mut origin, relay, reload: _reload, .. } = start();
    origin.write_all(&[0x88, 0x02, 0x03, 0xE9]).await.unwrap();
    assert_eq!(read_frame(&mut client).await.close(), (1001, ""));
    client.write_all(&client_frame(true, TEXT, b"deny")).await.unwrap();
    let (at_client, at_origin) = closes_at_both_ends(&mut client, &mut origin).await;
    assert_eq!(at_client, []);
    assert_eq!(at_origin.iter().map(Frame::close).collect::<Vec<_>>(), [(POLICY_VIOLATION, DENIAL)]);
    drop((client, origin));
    assert!(matches!(outcome(relay).await.ended, Ended::Policy(_)));
}

#[tokio::test]
async fn after_its_close_the_client_may_send_nothing_and_the_origin_gets_no_second_close() {
    let Session { mut client, mut origin, relay, reload: _reload, .. } = start();
    client.write_all(&client_frame(true, CLOSE, &1000u16.to_be_bytes())).await.unwrap();
    assert_eq!(read_frame(&mut origin).await.close(), (1000, ""));
    client.write_all(&client_frame(true, TEXT, b"more")).await.unwrap();
    let (at_client, at_origin) = closes_at_both_ends(&mut client, &mut origin).await;
    assert_eq!(at_origin, []);
    let expected = close(PROTOCOL_ERROR, "a frame after the client's close frame");
    assert_eq!(at_client.iter().map(Frame::close).collect::<Vec<_>>(), [(expected.code, expected.reason.as_str())]);
    drop((client, origin));
    assert_eq!(outcome(relay).await.ended, Ended::Refused(expected));
}

#[tokio::test]
async fn bytes_read_before_the_relay_go_first() {
    let second = client_frame(true, TEXT, b"second");
    let to_upstream = [&client_frame(true, TEXT, b"first")[..], &second[..3]].concat();
    let prefill = Prefill { to_upstream, to_client: b"\x81\x03one".to_vec() };
    let Session { mut client, mut origin, reload: _reload, .. } = Setup { prefill, ..Setup::default() }.start();
    assert_eq!(read_frame(&mut client).await.payload, b"one");
    assert_eq!(read_frame(&mut origin).await.text(), "first");
    client.write_all(&second[3..]).await.unwrap();
    assert_eq!(read_frame(&mut origin).await.text(), "second");
    origin.write_all(b"\x81\x03two").await.unwrap();
    assert_eq!(read_frame(&mut client).await.payload, b"two");
}

#[tokio::test]
async fn half_closes_travel_both_ways() {
    let Session { mut client, mut origin, relay, reload: _reload, .. } = start();
    client.write_all(&client_frame(true, TEXT, b"last")).await.unwrap();
    client.shutdown().await.unwrap();
    assert_eq!(frames(&rest_of(&mut origin).await)[0].text(), "last");
    origin.write_all(b"\x81\x05reply").await.unwrap();
    origin.shutdown().await.unwrap();
    assert_eq!(rest_of(&mut client).await, b"\x81\x05reply");
    let outcome = outcome(relay).await;
    assert_eq!((outcome.ended, outcome.relayed.error.is_none()), (Ended::Closed, true));
}

#[tokio::test]
async fn compressed_messages_are_inspected_and_reach_the_origin_uncompressed() {
    let deflate = Some(Deflate { client_no_context_takeover: false });
    let Session { mut client, mut origin, seen, reload: _reload, .. } = Setup { deflate, ..Setup::default() }.start();
    let mut deflater = Deflater::new();
    let message = "a compressed message, a compressed message";
    let input = [
        compressed_frame(true, TEXT, &deflater.compress(message.as_bytes())),
        compressed_frame(true, BINARY, &deflater.compress(b"\x01\x02\x03")),
        compressed_frame(true, TEXT, &deflater.compress(b"deny PLACEHOLDER")),
    ]
    .concat();
    client.write_all(&input).await.unwrap();
    let (at_client, at_origin) = closes_at_both_ends(&mut client, &mut origin).await;
    let summary: Vec<(u8, u8, &[u8])> =
        at_origin.iter().map(|frame| (frame.rsv, frame.opcode, &frame.payload[..])).collect();
    assert_eq!(summary[..2], [(0, TEXT, message.as_bytes()), (0, BINARY, b"\x01\x02\x03")]);
    assert_eq!(at_origin[2].close().0, POLICY_VIOLATION);
    assert_eq!(at_client[0].close().0, POLICY_VIOLATION);
    assert_eq!(*seen.lock().unwrap(), [message, "deny PLACEHOLDER"]);
}

#[tokio::test(start_paused = true)]
async fn a_text_message_must_not_stall_nor_drag_on() {
    let limits = Limits::default();
    let stalled = Setup { limits: limits.clone(), ..Setup::default() }.start();
    let Session { mut client, mut origin, relay, reload: _reload, .. } = stalled;
    client.write_all(&client_frame(false, TEXT, b"never finished")).await.unwrap();
    let started = Instant::now();
    let (at_client, _) = closes_at_both_ends(&mut client, &mut origin).await;
    assert_eq!(at_client[0].close(), (PROTOCOL_ERROR, "no byte of the text message for 30s"));
    assert_eq!(started.elapsed().as_secs(), 30);
    drop((client, origin));
    assert!(matches!(outcome(relay).await.ended, Ended::Refused(_)));

    // One fragment every 20 s keeps it alive, for 120 s at most.
    let Session { mut client, mut origin, relay, reload: _reload, .. } = Setup { limits, ..Setup::default() }.start();
    let started = Instant::now();
    client.write_all(&client_frame(false, TEXT, b"a")).await.unwrap();
    let sender = tokio::spawn(async move {
        while client.write_all(&client_frame(false, CONTINUATION, b"a")).await.is_ok() {
            sleep(Duration::from_secs(20)).await;
            client.write_all(&client_frame(true, PING, b"")).await.ok();
        }
        client
    });
    let at_origin = frames(&rest_of(&mut origin).await);
    let expected = (PROTOCOL_ERROR, "text message not complete within 120s");
    assert_eq!(at_origin.last().map(Frame::close), Some(expected));
    assert_eq!(started.elapsed().as_secs(), 120);
    drop(origin);
    let outcome = outcome(relay).await;
    assert!(matches!(outcome.ended, Ended::Refused(Close { code: PROTOCOL_ERROR, .. })));
    drop(sender);
}

#[tokio::test(start_paused = true)]
async fn a_relay_idle_both_ways_ends_timed_out() {
    let idle = Duration::from_secs(60);
    let Session { mut client, origin: _origin, relay, reload: _reload, .. } =
        Setup { idle, ..Setup::default() }.start();
    sleep(Duration::from_secs(50)).await;
    client.write_all(&client_frame(true, PING, b"")).await.unwrap();
    let started = Instant::now();
    let outcome = outcome(relay).await;
    assert_eq!(started.elapsed().as_secs(), 60, "activity put the end off");
    assert_eq!(outcome.relayed.error.map(|error| error.kind()), Some(io::ErrorKind::TimedOut));
    assert_eq!(outcome.ended, Ended::Closed);
}
