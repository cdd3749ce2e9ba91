//! The hub's tests: windows, replays, churn and fan-out, without sockets.

use super::*;
use crate::protocol::outbound;

fn outbox(id: ConnId) -> Arc<Outbox> {
    let immediate = crate::config::BatchConfig {
        delivery_window_ms: 0,
        ..Default::default()
    };
    Arc::new(Outbox::new(
        id,
        1 << 20,
        Arc::new(crate::batch::DeliveryPolicy::new(&immediate)),
        Arc::default(),
        Arc::default(),
    ))
}

/// A hub whose rooms collect for a 60 s window without a leading edge: only `tick`
/// delivers.
fn collecting_hub() -> Hub {
    let window = crate::config::BatchConfig {
        delivery_window_ms: 60_000,
        leading_edge: false,
        ..Default::default()
    };
    let window = Arc::new(DeliveryPolicy::new(&window));
    Hub::with_window(window, Arc::default(), usize::MAX)
}

/// The JSON of everything queued in `outbox`, taken out.
fn queued(outbox: &Outbox) -> Vec<String> {
    let mut drained = crate::outbox::Drained::default();
    outbox.drain(&mut drained);
    drained
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(m.json()).into_owned())
        .collect()
}

#[test]
fn a_replay_that_ends_while_the_window_is_open_gets_only_what_the_history_lacks() {
    let hub = collecting_hub();
    let (member, joiner) = (outbox(1), outbox(2));
    hub.join("r", &member, false, |_| {});
    let ticket = hub.join_replaying("r", &joiner, false, |_| {}).unwrap();
    let plain = Encoded::from_json(br#"{"n":0}"#);
    let m1 = outbound::with_offset(&plain, 1);
    let m2 = outbound::with_offset(&plain, 2);
    hub.fan_out("r", &m1);
    hub.fan_out("r", &m2);
    // The history read carried offset 1; both are still in the room's window.
    let history = Encoded::from_json(br#"{"type":"history"}"#);
    hub.finish_replay("r", ticket, &history, 1, None).unwrap();
    // At once: the history, then what it lacks of the open window.
    assert_eq!(
        queued(&joiner),
        [
            r#"{"type":"history"}"#.to_string(),
            String::from_utf8_lossy(m2.json()).into_owned()
        ]
    );
    hub.tick(Pace::DEFAULT);
    assert!(queued(&joiner).is_empty(), "nothing twice at the tick");
    // The member got the window as one frame: both messages.
    let window = queued(&member);
    assert_eq!(window.len(), 1);
    assert!(window[0].starts_with(r#"{"type":"batch""#), "{window:?}");
}

/// A hub whose rooms deliver every message at once.
fn immediate_hub() -> Hub {
    let immediate = crate::config::BatchConfig {
        delivery_window_ms: 0,
        ..Default::default()
    };
    Hub::with_window(
        Arc::new(DeliveryPolicy::new(&immediate)),
        Arc::default(),
        usize::MAX,
    )
}

fn json(e: &Encoded) -> String {
    String::from_utf8_lossy(e.json()).into_owned()
}

/// The read of a joiner's history saw offsets 1 and 2 appended in Redis; their pub/sub
/// copies reach the room one before and one after the replay ends. Neither is sent to
/// the joiner again, at once or in a window; what follows is.
#[test]
fn a_history_ahead_of_the_live_messages_is_not_followed_by_them_again() {
    for hub in [immediate_hub(), collecting_hub()] {
        let (member, joiner) = (outbox(1), outbox(2));
        hub.join("r", &member, false, |_| {});
        let ticket = hub.join_replaying("r", &joiner, false, |_| {}).unwrap();
        let epoch: Arc<str> = "e1".into();
        let m: Vec<Encoded> = (1..=4)
            .map(|o| outbound::with_offset(&Encoded::from_json(br#"{"n":0}"#), o))
            .collect();
        hub.fan_out_durable("r", &epoch, &m[0]);
        let history = outbound::history("r", "e1", Some(2), &m[..2], None);
        hub.finish_replay("r", ticket, &history, 2, Some(&epoch))
            .unwrap();
        for message in &m[1..] {
            hub.fan_out_durable("r", &epoch, message);
        }
        hub.tick(Pace::DEFAULT);
        let got: Vec<String> = queued(&joiner)
            .into_iter()
            .filter(|f| !f.contains("epoch_changed"))
            .collect();
        assert_eq!(got, [json(&history), json(&m[2]), json(&m[3])]);
        // The member that was there all along got each once.
        assert_eq!(numbers_of_offsets(&member), [1, 2, 3, 4]);
    }
}

/// The offsets of the durable messages an outbox holds, framed windows taken apart.
fn numbers_of_offsets(outbox: &Outbox) -> Vec<u64> {
    let mut out = Vec::new();
    for frame in queued(outbox) {
        let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
        let messages = match value["messages"].as_array() {
            Some(batch) if value["type"] == "batch" => batch.clone(),
            _ => vec![value],
        };
        out.extend(messages.iter().filter_map(|m| m["offset"].as_u64()));
    }
    out
}

/// A durable room's first message arrives while a joiner's history read finds the room
/// empty (epoch ""): the joiner learns the epoch before that message, or it could not
/// resume from what it saw (a client that knows no epoch asks for the whole history).
#[test]
fn a_joiner_whose_history_was_empty_learns_the_epoch_of_what_was_held_for_it() {
    let hub = immediate_hub();
    let (plain_member, joiner) = (outbox(1), outbox(2));
    hub.join("r", &plain_member, false, |_| {});
    let ticket = hub.join_replaying("r", &joiner, false, |_| {}).unwrap();
    let epoch: Arc<str> = "e1".into();
    let content = Encoded::from_json(br#"{"n":0}"#);
    let (m1, m2) = (
        outbound::with_offset(&content, 1),
        outbound::with_offset(&content, 2),
    );
    hub.fan_out_durable("r", &epoch, &m1);
    let empty: Arc<str> = "".into();
    let history = outbound::history("r", "", Some(0), &[], None);
    hub.finish_replay("r", ticket, &history, 0, Some(&empty))
        .unwrap();
    hub.fan_out_durable("r", &epoch, &m2);
    assert_eq!(
        queued(&joiner),
        [
            json(&history),
            json(&outbound::epoch_changed("r", "e1")),
            json(&m1),
            json(&m2)
        ]
    );
    // The member that joined without a replay has no epoch to resume from either way.
    assert_eq!(
        queued(&plain_member).last().map(String::as_str),
        Some(json(&m2).as_str())
    );
}

/// The numbers (`{"n":N}`) an outbox holds, framed windows taken apart.
fn numbers(outbox: &Outbox) -> Vec<u64> {
    let mut out = Vec::new();
    for json in queued(outbox) {
        let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        let items = match v["messages"].as_array() {
            Some(batch) => batch.clone(),
            None => vec![v],
        };
        out.extend(items.iter().filter_map(|m| m["n"].as_u64()));
    }
    out
}

#[test]
fn windows_under_concurrent_ticks_and_churn_lose_nothing_and_never_reorder() {
    let window = crate::config::BatchConfig {
        delivery_window_ms: 60_000,
        leading_edge: true,
        ..Default::default()
    };
    let hub = Arc::new(Hub::with_window(
        Arc::new(DeliveryPolicy::new(&window)),
        Arc::default(),
        usize::MAX,
    ));
    let (steady, churner) = (outbox(1), outbox(2));
    hub.join("r", &steady, false, |_| {});
    const N: u64 = 20_000;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let (hub, done) = (hub.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                hub.tick(Pace::DEFAULT);
                std::thread::yield_now();
            }
        })
    };
    let churn = {
        let (hub, done, churner) = (hub.clone(), done.clone(), churner.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                hub.join("r", &churner, false, |_| {});
                std::thread::yield_now();
                hub.leave("r", 2, |_| {});
                seen.extend(numbers(&churner));
            }
            seen
        })
    };
    for n in 0..N {
        hub.fan_out(
            "r",
            &Encoded::from_json(format!(r#"{{"n":{n}}}"#).as_bytes()),
        );
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    ticker.join().unwrap();
    let mut churned = churn.join().unwrap();
    hub.tick(Pace::DEFAULT);
    churned.extend(numbers(&churner));
    assert_eq!(numbers(&steady), (0..N).collect::<Vec<_>>());
    assert!(!churned.is_empty());
    assert!(
        churned.windows(2).all(|w| w[0] < w[1]),
        "a socket that came and went got something twice or out of order"
    );
}

#[test]
fn first_join_and_last_leave_are_reported() {
    let hub = Hub::new();
    let (a, b) = (outbox(1), outbox(2));
    let first = Joined::New {
        first: true,
        members: 1,
    };
    let second = Joined::New {
        first: false,
        members: 2,
    };
    assert_eq!(hub.join("r", &a, false, |_| {}), first);
    assert_eq!(hub.join("r", &b, false, |_| {}), second);
    assert_eq!(hub.join("r", &b, false, |_| {}), Joined::Already);
    let one_left = Left::Gone {
        last: false,
        members: 1,
    };
    let none_left = Left::Gone {
        last: true,
        members: 0,
    };
    assert_eq!(hub.leave("r", 1, |_| {}), one_left);
    assert_eq!(hub.leave("r", 1, |_| {}), Left::NotMember);
    assert_eq!(hub.leave("r", 2, |_| {}), none_left);
    assert_eq!(hub.room_count(), 0);
}

#[test]
fn a_million_join_leave_cycles_leave_nothing_behind() {
    let hub = Arc::new(Hub::new());
    let threads: Vec<_> = (0..2u64)
        .map(|t| {
            let hub = hub.clone();
            std::thread::spawn(move || {
                let sockets: Vec<_> = (0..10).map(|i| outbox(t * 100 + i)).collect();
                let names: Vec<String> = (0..1000).map(|r| format!("room-{r}")).collect();
                for i in 0..500_000usize {
                    let s = &sockets[i % sockets.len()];
                    let room = &names[i % names.len()];
                    hub.join(room, s, false, |_| {});
                    hub.leave(room, s.id(), |_| {});
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(hub.room_count(), 0);
}

#[test]
fn fan_out_reaches_members_only() {
    let hub = Hub::new();
    let (a, b) = (outbox(1), outbox(2));
    hub.add_socket(a.clone());
    hub.add_socket(b.clone());
    hub.join("r", &a, false, |_| {});
    let m = Encoded::from_json(b"1");
    assert_eq!(hub.fan_out("r", &m).queued, 1);
    assert_eq!(hub.fan_out("nobody", &m).queued, 0);
    assert_eq!(hub.fan_out_all(&m).queued, 2);
}
