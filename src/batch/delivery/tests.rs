use super::*;
use crate::config::RoomClass;

fn window(ms: u64, max_messages: usize, max_bytes: usize) -> DeliveryPolicy {
    DeliveryPolicy::new(&BatchConfig {
        delivery_window_ms: ms,
        leading_edge: true,
        max_batch_messages: max_messages,
        max_batch_bytes: max_bytes,
        publish_window_ms: 50,
    })
}

fn msg(n: u32) -> Encoded {
    Encoded::from_json(format!(r#"{{"n":{n}}}"#).as_bytes())
}

/// The payload of a server frame (unmasked; RFC 6455 length encoding).
fn body(frame: &Bytes) -> &[u8] {
    let h = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &frame[h..]
}

mod any_messages {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            // Decimals serde_json parses back exactly (its default float parsing is
            // not exact for every 17-digit number; volley forwards the bytes anyway).
            (-1_000_000_000i64..1_000_000_000).prop_map(|n| Value::from(n as f64 / 1000.0)),
            ".{0,12}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(".{0,6}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// The messages a client would see in these frames, batches unwrapped, in order.
    fn unwrap(frames: &[Bytes]) -> Vec<Value> {
        let mut out = Vec::new();
        for frame in frames {
            let v: Value = serde_json::from_slice(body(frame)).expect("a JSON frame");
            if v["type"] == "batch" {
                out.extend(v["messages"].as_array().expect("messages").iter().cloned());
            } else {
                out.push(v);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn batch_frames_carry_exactly_the_messages_in_order(
            messages in prop::collection::vec((".{0,16}", json(), any::<u32>()), 1..40),
            max_messages in 1usize..12,
            max_bytes in 1usize..4096,
        ) {
            let w = window(50, max_messages, max_bytes);
            let items: Vec<Encoded> = messages
                .iter()
                .map(|(room, content, ts)| {
                    let raw = serde_json::value::to_raw_value(content).unwrap();
                    crate::protocol::outbound::room_message(room, &raw, u64::from(*ts))
                })
                .collect();
            let mut out = Vec::new();
            w.frames(&items, true, &mut out, |_, _| {});
            let want: Vec<Value> = items
                .iter()
                .map(|e| serde_json::from_slice(e.json()).unwrap())
                .collect();
            prop_assert_eq!(unwrap(&out), want);
            for (got, (room, content, _)) in unwrap(&out).iter().zip(&messages) {
                prop_assert_eq!(&got["roomId"], &Value::from(room.as_str()));
                prop_assert_eq!(&got["content"], content);
            }
        }
    }
}

#[test]
fn two_or_more_become_one_batch_frame() {
    let w = window(50, 100, 1 << 20);
    let items = [msg(1), msg(2), msg(3)];
    let mut out = Vec::new();
    w.frames(&items, true, &mut out, |_, _| {});
    assert_eq!(out.len(), 1);
    assert_eq!(
        body(&out[0]),
        br#"{"type":"batch","messages":[{"n":1},{"n":2},{"n":3}]}"#
    );
}

#[test]
fn one_message_goes_bare_and_shared() {
    let w = window(50, 100, 1 << 20);
    let items = [msg(7)];
    let mut out = Vec::new();
    w.frames(&items, true, &mut out, |_, _| {});
    assert_eq!(out[0].as_ptr(), items[0].frame().as_ptr());
}

#[test]
fn limits_split_batches_in_order() {
    let w = window(50, 2, 1 << 20);
    let items: Vec<_> = (1..=5).map(msg).collect();
    let mut out = Vec::new();
    w.frames(&items, true, &mut out, |_, _| {});
    let bodies: Vec<_> = out.iter().map(|f| body(f).to_vec()).collect();
    assert_eq!(
        bodies,
        vec![
            br#"{"type":"batch","messages":[{"n":1},{"n":2}]}"#.to_vec(),
            br#"{"type":"batch","messages":[{"n":3},{"n":4}]}"#.to_vec(),
            br#"{"n":5}"#.to_vec(),
        ]
    );
    let w = window(50, 100, 1024);
    let big: Vec<_> = (0..3)
        .map(|_| Encoded::from_json(&vec![b'1'; 600]))
        .collect();
    let mut out = Vec::new();
    w.frames(&big, true, &mut out, |_, _| {});
    assert_eq!(
        out.len(),
        3,
        "each 600-byte message alone under a 1024-byte cap"
    );
}

#[test]
fn identical_lists_share_one_batch() {
    let w = window(60_000, 100, 1 << 20);
    let items = [msg(1), msg(2)];
    let (mut a, mut b) = (Vec::new(), Vec::new());
    w.frames(&items, true, &mut a, |_, _| {});
    w.frames(&items.clone(), true, &mut b, |_, _| {});
    assert_eq!(
        a[0].as_ptr(),
        b[0].as_ptr(),
        "second socket reuses the first's frame"
    );
    let other = [msg(1), msg(2)];
    let mut c = Vec::new();
    w.frames(&other, true, &mut c, |_, _| {});
    assert_ne!(
        a[0].as_ptr(),
        c[0].as_ptr(),
        "equal text, different messages"
    );
}

#[test]
fn window_zero_is_one_frame_per_message() {
    let w = window(0, 100, 1 << 20);
    let items = [msg(1), msg(2)];
    let mut out = Vec::new();
    w.frames(&items, false, &mut out, |_, _| {});
    assert_eq!(out.len(), 2);
    let now = Instant::now();
    assert!(w.sends_at_once(Pace::DEFAULT, Some(now), now));
}

#[test]
fn leading_edge_only_after_a_quiet_window() {
    let w = window(50, 100, 1 << 20);
    let now = Instant::now();
    let p = Pace::DEFAULT;
    assert!(w.sends_at_once(p, None, now));
    assert!(!w.sends_at_once(p, Some(now), now));
    assert!(w.sends_at_once(p, Some(now - Duration::from_millis(60)), now));
    let at = w.next_tick(p, now);
    assert!(at > now && at <= now + Duration::from_millis(50));
}

#[test]
fn room_classes_get_paces_of_their_own_and_share_equal_ones() {
    let config = BatchConfig::default();
    let class = |pattern: &str, ms: Option<u64>, edge: Option<bool>| RoomClass {
        pattern: pattern.into(),
        delivery_window_ms: ms,
        leading_edge: edge,
        ..RoomClass::default()
    };
    let classes = RoomClasses::compile(
        &[
            class("chat:*", Some(0), None),
            class("scores:*", Some(250), None),
            class("ledger:*", None, None),
            class("more-scores:*", Some(250), None),
            class("quiet:*", None, Some(false)),
        ],
        &config,
    )
    .unwrap();
    let w = DeliveryPolicy::with_classes(&config, Arc::new(classes));
    assert_eq!(
        w.paces().count(),
        4,
        "default, 0 ms, 250 ms, no leading edge"
    );
    assert_eq!(w.pace_of("lobby"), Pace::DEFAULT);
    assert_eq!(w.pace_of("ledger:1"), Pace::DEFAULT, "no window of its own");
    assert_eq!(w.pace_of("scores:1"), w.pace_of("more-scores:1"));
    assert!(w.is_immediate(w.pace_of("chat:1")));
    assert!(!w.is_immediate(Pace::DEFAULT));
    let now = Instant::now();
    let scores = w.pace_of("scores:1");
    let at = w.next_tick(scores, now);
    assert!(at > now && at <= now + Duration::from_millis(250));
    let quiet = w.pace_of("quiet:1");
    assert!(
        !w.sends_at_once(quiet, None, now),
        "no leading edge for quiet rooms"
    );
    assert!(w.sends_at_once(scores, None, now));
}

#[test]
fn a_frame_is_compressed_once_and_shared_and_small_ones_stay_plain() {
    let w = window(50, 100, 1 << 20).with_compression(64, 1);
    let big = Encoded::from_json(format!(r#"{{"n":"{}"}}"#, "x".repeat(500)).as_bytes());
    let a = w.compressed(big.frame());
    let b = w.compressed(big.frame());
    assert_eq!(
        a.as_ptr(),
        b.as_ptr(),
        "the second socket writes the first's bytes"
    );
    assert_eq!(a[0], 0xC1);
    let small = msg(1);
    assert_eq!(w.compressed(small.frame()).as_ptr(), small.frame().as_ptr());
}
