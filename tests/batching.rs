//! Delivery windows: bursts coalesce, window 0 does not, idle sockets get the leading edge.

mod common;

use common::*;
use serde_json::{json, Value};

fn burst(room: &str, n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| json!({"type":"message","roomId":room,"content":i}))
        .collect()
}

#[tokio::test]
async fn a_burst_inside_one_window_arrives_coalesced_and_in_order() {
    let server = start(|c| c.batch.delivery_window_ms = 50).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("scores").await;
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("scores", 20)).await;

    let mut frames = 0;
    let mut batches = 0;
    let mut seen = Vec::new();
    while seen.len() < 20 {
        let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
        frames += 1;
        if frame["type"] == "batch" {
            batches += 1;
            for m in frame["messages"].as_array().unwrap() {
                assert_eq!(m["type"], "message");
                seen.push(m["content"].as_u64().unwrap());
            }
        } else {
            assert_eq!(frame["type"], "message");
            seen.push(frame["content"].as_u64().unwrap());
        }
    }
    assert_eq!(
        seen,
        (0..20).collect::<Vec<_>>(),
        "all 20, in publish order"
    );
    // At most a leading-edge frame plus the window(s) the burst straddles.
    assert!(frames <= 3, "20 messages took {frames} frames");
    assert!(batches >= 1);
}

#[tokio::test]
async fn window_zero_sends_one_frame_per_message() {
    let server = start(|c| c.batch.delivery_window_ms = 0).await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("t").await;
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("t", 20)).await;
    for i in 0..20u64 {
        let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
        assert_eq!(frame["type"], "message", "no batch frames with window 0");
        assert_eq!(frame["content"], i);
    }
}

#[tokio::test]
async fn leading_edge_sends_at_once_then_holds_for_the_window_and_shutdown_flushes() {
    // A window far longer than the test: only the leading edge or shutdown can deliver.
    let server = start(|c| {
        c.batch.delivery_window_ms = 60_000;
        c.batch.leading_edge = true;
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    // Idle socket: its first message (the join notice) goes out at once.
    sub.join("r").await;
    for i in 0..3 {
        let (status, _) = api_publish(addr, &json!({"roomId":"r","content":i})).await;
        assert_eq!(status, 200);
    }
    let report = tokio::spawn(server.shutdown());
    // Held in the window, then flushed as one batch, then closed with 1001.
    let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
    assert_eq!(frame["type"], "batch", "{frame}");
    let contents: Vec<_> = frame["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].clone())
        .collect();
    assert_eq!(contents, vec![json!(0), json!(1), json!(2)]);
    assert_eq!(
        sub.expect_close().await,
        (1001, "server shutting down".to_string())
    );
    assert!(report.await.unwrap().drained);
}

#[tokio::test]
async fn without_leading_edge_even_the_first_message_waits_for_the_window() {
    let server = start(|c| {
        c.batch.delivery_window_ms = 60_000;
        c.batch.leading_edge = false;
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.send(json!({"type":"join","roomId":"r"})).await;
    // The join is done once the node counts the room.
    tokio::time::timeout(WAIT, async {
        while health(addr).await["rooms"] != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the join never registered");
    api_publish(addr, &json!({"roomId":"r","content":"x"})).await;
    let report = tokio::spawn(server.shutdown());
    // Had the join notice gone out early, it would be a bare frame.
    let frame: Value = serde_json::from_str(&sub.next_frame().await).unwrap();
    assert_eq!(frame["type"], "batch", "{frame}");
    assert_eq!(frame["messages"][0]["type"], "user_joined");
    assert_eq!(frame["messages"][1]["content"], "x");
    assert_eq!(sub.expect_close().await.0, 1001);
    assert!(report.await.unwrap().drained);
}

#[tokio::test]
async fn many_subscribers_of_one_room_get_identical_batches() {
    let server = start(|c| c.batch.delivery_window_ms = 50).await;
    let addr = server.local_addr();
    let mut subs = Vec::new();
    for _ in 0..20 {
        let mut c = Client::connect(addr).await;
        c.join("board").await;
        subs.push(c);
    }
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("board", 10)).await;
    for sub in &mut subs {
        let mut got = Vec::new();
        while got.len() < 10 {
            let m = sub.next_message().await;
            if m["type"] == "message" {
                got.push(m["content"].as_u64().unwrap());
            }
        }
        assert_eq!(got, (0..10).collect::<Vec<_>>());
    }
}

/// Chat at 0 ms by default, `scores:*` on a 300 ms window without a leading edge.
fn two_paces(c: &mut volley::Config) {
    c.batch.delivery_window_ms = 0;
    c.rooms = vec![volley::config::RoomClass {
        pattern: "scores:*".into(),
        delivery_window_ms: Some(300),
        leading_edge: Some(false),
        ..Default::default()
    }];
}

#[tokio::test]
async fn rooms_of_a_class_keep_the_classes_window_beside_rooms_on_the_default() {
    let server = start(two_paces).await;
    let addr = server.local_addr();
    let mut scores = Client::connect(addr).await;
    scores.join("scores:1").await;
    let mut chat = Client::connect(addr).await;
    chat.join("lobby").await;
    let mut publisher = Client::connect(addr).await;
    publisher.send_burst(&burst("scores:1", 3)).await;
    publisher.send_burst(&burst("lobby", 3)).await;

    // The class's window: the burst waits for its tick and leaves as one frame.
    let got = frame_messages(&scores.next_frame().await);
    let contents: Vec<&Value> = got.iter().map(|m| &m["content"]).collect();
    assert_eq!(contents, [&json!(0), &json!(1), &json!(2)], "{got:?}");
    // The default window, 0: one frame per message.
    for i in 0..3 {
        let got = frame_messages(&chat.next_frame().await);
        assert_eq!(got.len(), 1, "window 0 sends each message alone: {got:?}");
        assert_eq!(got[0]["content"], i);
    }
}

#[tokio::test]
async fn a_chat_line_due_at_once_leaves_alone_and_the_scores_keep_their_tick() {
    let server = start(two_paces).await;
    let addr = server.local_addr();
    let mut both = Client::connect(addr).await;
    both.join("scores:1").await;
    both.join("lobby").await;
    let mut publisher = Client::connect(addr).await;
    // Two scoreboard updates wait in their room's window for its 300 ms tick; the chat
    // line right behind them goes at once, alone: a room's window leaves at its own tick.
    let mut frames = burst("scores:1", 2);
    frames.push(json!({"type":"message","roomId":"lobby","content":"hi"}));
    publisher.send_burst(&frames).await;
    let seen = |frame: &str| -> Vec<(Value, Value)> {
        frame_messages(frame)
            .iter()
            .map(|m| (m["roomId"].clone(), m["content"].clone()))
            .collect()
    };
    assert_eq!(
        seen(&both.next_frame().await),
        [(json!("lobby"), json!("hi"))]
    );
    assert_eq!(
        seen(&both.next_frame().await),
        [(json!("scores:1"), json!(0)), (json!("scores:1"), json!(1))]
    );
}

/// `[batch]` at 60 s without a leading edge (only shutdown delivers), `sync*` rooms at 0
/// ms: a socket that gets a `sync` room's notice knows the node read its earlier frames.
fn held_for_shutdown(c: &mut volley::Config) {
    c.batch.delivery_window_ms = 60_000;
    c.batch.leading_edge = false;
    c.rooms = vec![volley::config::RoomClass {
        pattern: "sync*".into(),
        delivery_window_ms: Some(0),
        ..Default::default()
    }];
}

/// What one client saw: room `r`'s messages as (type, content), and every frame's text.
#[derive(Default)]
struct Seen {
    r: Vec<(String, Value)>,
    frames: Vec<String>,
}

impl Seen {
    fn add(&mut self, text: String) {
        for m in frame_messages(&text) {
            if m["roomId"] == "r" {
                let ty = m["type"].as_str().unwrap_or_default().to_string();
                self.r.push((ty, m["content"].clone()));
            }
        }
        self.frames.push(text);
    }
}

/// Sends `frames`, then joins `sync`, and returns once the node has read them all; what
/// arrives meanwhile is kept in `seen`.
async fn send_then_sync(client: &mut Client, frames: &[Value], sync: &str, seen: &mut Seen) {
    client.send_burst(frames).await;
    client.send(json!({"type":"join","roomId":sync})).await;
    loop {
        let text = client.next_frame().await;
        let synced = frame_messages(&text)
            .iter()
            .any(|m| m["type"] == "user_joined" && m["roomId"] == sync);
        seen.add(text);
        if synced {
            return;
        }
    }
}

/// Reads every frame until the close into `seen`, and answers the close.
async fn until_close(client: &mut Client, seen: &mut Seen) {
    loop {
        match client.next_event().await {
            Event::Frame(text) => seen.add(text),
            // Reading on sends the close reply; the connection then ends.
            Event::Close(..) => continue,
            Event::Ended => return,
        }
    }
}

#[tokio::test]
async fn sockets_that_join_or_leave_while_a_window_is_open_get_exactly_their_share() {
    let server = start(held_for_shutdown).await;
    let addr = server.local_addr();
    let publish = |n: u64| async move {
        let (status, _) = api_publish(addr, &json!({"roomId":"r","content":n})).await;
        assert_eq!(status, 200);
    };
    let join_r = [json!({"type":"join","roomId":"r"})];
    let (mut early_saw, mut leaver_saw, mut late_saw) = Default::default();
    let mut early = Client::connect(addr).await;
    send_then_sync(&mut early, &join_r, "sync-a", &mut early_saw).await;
    let mut leaver = Client::connect(addr).await;
    send_then_sync(&mut leaver, &join_r, "sync-b", &mut leaver_saw).await;
    publish(0).await;
    publish(1).await;
    let leave_r = [json!({"type":"leave","roomId":"r"})];
    send_then_sync(&mut leaver, &leave_r, "sync-c", &mut leaver_saw).await;
    let mut late = Client::connect(addr).await;
    send_then_sync(&mut late, &join_r, "sync-d", &mut late_saw).await;
    publish(2).await;

    // All of it is still in the room's window; shutdown delivers it.
    let report = tokio::spawn(server.shutdown());
    let joined = || ("user_joined".to_string(), Value::Null);
    let message = |n: u64| ("message".to_string(), json!(n));
    until_close(&mut early, &mut early_saw).await;
    assert_eq!(
        early_saw.r,
        [
            joined(),
            joined(),
            message(0),
            message(1),
            ("user_left".to_string(), Value::Null),
            joined(),
            message(2)
        ]
    );
    // The leaver gets what came while it was in the room, nothing after.
    until_close(&mut leaver, &mut leaver_saw).await;
    assert_eq!(leaver_saw.r, [joined(), message(0), message(1)]);
    // The late joiner gets only what came after its join.
    until_close(&mut late, &mut late_saw).await;
    assert_eq!(late_saw.r, [joined(), message(2)]);
    assert!(report.await.unwrap().drained);
}

#[tokio::test]
async fn each_rooms_window_is_one_frame_shared_by_its_subscribers() {
    let server = start(|c| {
        held_for_shutdown(c);
        // The first socket's joins go at once (the rooms were quiet); the second's
        // notices open the rooms' windows, which both sockets are full members of.
        c.batch.leading_edge = true;
    })
    .await;
    let addr = server.local_addr();
    let joins = [
        json!({"type":"join","roomId":"x"}),
        json!({"type":"join","roomId":"y"}),
    ];
    let (mut a_saw, mut b_saw, mut p_saw) = Default::default();
    let mut a = Client::connect(addr).await;
    send_then_sync(&mut a, &joins, "sync-a", &mut a_saw).await;
    let mut b = Client::connect(addr).await;
    send_then_sync(&mut b, &joins, "sync-b", &mut b_saw).await;
    let mut publisher = Client::connect(addr).await;
    let mut frames = burst("x", 2);
    frames.extend(burst("y", 2));
    send_then_sync(&mut publisher, &frames, "sync-p", &mut p_saw).await;

    let report = tokio::spawn(server.shutdown());
    until_close(&mut a, &mut a_saw).await;
    until_close(&mut b, &mut b_saw).await;
    until_close(&mut publisher, &mut p_saw).await;
    let windows = |seen: &Seen| -> Vec<String> {
        seen.frames
            .iter()
            .filter(|f| f.starts_with(r#"{"type":"batch""#) && f.contains(r#""type":"message""#))
            .cloned()
            .collect()
    };
    let (a_windows, b_windows) = (windows(&a_saw), windows(&b_saw));
    let rooms: Vec<Vec<(Value, Value)>> = a_windows
        .iter()
        .map(|f| {
            frame_messages(f)
                .iter()
                .map(|m| (m["roomId"].clone(), m["type"].clone()))
                .collect()
        })
        .collect();
    let room = |r: &str| -> Vec<(Value, Value)> {
        ["user_joined", "message", "message"]
            .iter()
            .map(|t| (json!(r), json!(t)))
            .collect()
    };
    // One frame per room window (b's notice, the two messages), never one mixed batch.
    // (a's own notice of y waited in a's outbox, and went in a frame of its own.)
    assert_eq!(rooms, [room("x"), room("y")]);
    // Built once per room: both subscribers got the very same frames.
    assert_eq!(a_windows, b_windows);
    assert!(report.await.unwrap().drained);
}

#[tokio::test]
async fn a_room_window_past_one_outbox_of_bytes_leaves_before_its_tick() {
    let server = start(|c| {
        held_for_shutdown(c);
        c.limits.max_frame_bytes = 4096;
        c.limits.max_outbox_bytes = 16 * 1024;
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    let join_r = [json!({"type":"join","roomId":"r"})];
    send_then_sync(&mut sub, &join_r, "sync", &mut Seen::default()).await;
    // 20 x 1 KB in a 60 s window: more than one outbox's worth. The room delivers what it
    // collected instead of holding more, and a reader that reads keeps up.
    let body = "x".repeat(1000);
    for n in 0..20u64 {
        let (status, _) =
            api_publish(addr, &json!({"roomId":"r","content":{"n":n,"pad":body}})).await;
        assert_eq!(status, 200);
    }
    let mut got = Vec::new();
    while got.len() < 10 {
        for m in frame_messages(&sub.next_frame().await) {
            if m["type"] == "message" {
                got.push(m["content"]["n"].as_u64().unwrap());
            }
        }
    }
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
    assert_eq!(metric(addr, "volley_slow_consumers_closed_total").await, 0);
}

#[tokio::test]
async fn each_message_of_a_room_window_counts_as_a_delivery() {
    let server = start(|c| {
        c.batch.delivery_window_ms = 100;
        c.batch.leading_edge = false;
    })
    .await;
    let addr = server.local_addr();
    let mut sub = Client::connect(addr).await;
    sub.join("r").await; // its notice: one delivery, one frame
    for n in 0..5 {
        let (status, _) = api_publish(addr, &json!({"roomId":"r","content":n})).await;
        assert_eq!(status, 200);
    }
    let got = frame_messages(&sub.next_frame().await);
    assert_eq!(got.len(), 5, "one window, one frame: {got:?}");
    assert_eq!(metric(addr, "volley_deliveries_total").await, 6);
    assert_eq!(metric(addr, "volley_frames_out_total").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_of_1500_sockets_gets_every_message_in_order_when_its_writes_are_shared() {
    // Past 1 024 sockets due at once, a window's writes are shared among the runtime's
    // workers: every socket must still get every message, once, in order.
    let server = start(|c| {
        c.limits.notices = false;
        c.limits.max_connections_per_ip = 0;
    })
    .await;
    let addr = server.local_addr();
    let mut clients = Vec::new();
    for _ in 0..1500 {
        let mut c = Client::connect(addr).await;
        c.send(json!({"type":"join","roomId":"stadium"})).await;
        // Answered after the join on the same socket: the join was taken.
        c.send(json!({"type":"leave","roomId":"nowhere"})).await;
        clients.push(c);
    }
    for c in &mut clients {
        c.expect_error("not_in_room").await;
    }
    for n in 0..20 {
        let (status, _) = api_publish(addr, &json!({"roomId":"stadium","content":n})).await;
        assert_eq!(status, 200);
    }
    for c in &mut clients {
        let mut got = Vec::new();
        while got.len() < 20 {
            for m in frame_messages(&c.next_frame().await) {
                got.push(m["content"].as_u64().unwrap());
            }
        }
        assert_eq!(got, (0..20).collect::<Vec<u64>>());
    }
}
