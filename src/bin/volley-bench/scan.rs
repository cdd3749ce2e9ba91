//! Reads the bench's own messages out of frames without parsing JSON.
//!
//! Every published `content` has the fixed shape `{"p":P,"r":R,"s":S,"t":T,"x":"..."}`
//! (publisher, room, sequence per publisher and room, send time in µs), so a frame — bare
//! or `batch` — is scanned for `{"p":` and the numbers are read in place. Membership
//! notices and other frames carry no such marker and are skipped for free.

use memchr::memmem::Finder;

pub struct Marked {
    pub publisher: u32,
    pub room: u32,
    pub seq: u64,
    pub sent_us: u64,
}

pub struct Scanner {
    finder: Finder<'static>,
}

impl Scanner {
    pub fn new() -> Scanner {
        Scanner {
            finder: Finder::new(br#"{"p":"#),
        }
    }

    /// Calls `each` for every bench message in `frame`, in order.
    pub fn scan(&self, frame: &[u8], mut each: impl FnMut(Marked)) {
        let mut at = 0;
        while let Some(found) = self.finder.find(&frame[at..]) {
            let start = at + found + 5;
            match parse(&frame[start..]) {
                Some((m, used)) => {
                    each(m);
                    at = start + used;
                }
                None => at = start,
            }
        }
    }
}

fn number(bytes: &[u8]) -> Option<(u64, usize)> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    let mut n = 0u64;
    for &b in &bytes[..digits] {
        n = n * 10 + u64::from(b - b'0');
    }
    Some((n, digits))
}

fn parse(bytes: &[u8]) -> Option<(Marked, usize)> {
    let mut at = 0;
    let mut field = |key: &[u8]| -> Option<u64> {
        if !key.is_empty() {
            if !bytes[at..].starts_with(key) {
                return None;
            }
            at += key.len();
        }
        let (n, used) = number(&bytes[at..])?;
        at += used;
        Some(n)
    };
    let publisher = field(b"")? as u32;
    let room = field(br#","r":"#)? as u32;
    let seq = field(br#","s":"#)?;
    let sent_us = field(br#","t":"#)?;
    Some((
        Marked {
            publisher,
            room,
            seq,
            sent_us,
        },
        at,
    ))
}

/// The content of one bench message, padded with `x` to about `size` bytes.
pub fn content(publisher: u32, room: u32, seq: u64, sent_us: u64, size: usize) -> String {
    let mut s = format!(r#"{{"p":{publisher},"r":{room},"s":{seq},"t":{sent_us},"x":""#);
    let pad = size.saturating_sub(s.len() + 2);
    s.extend(std::iter::repeat_n('x', pad));
    s.push_str("\"}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_message_in_a_batch() {
        let a = content(1, 2, 3, 4, 60);
        let b = content(5, 6, 7, 8, 10);
        let frame = format!(
            r#"{{"type":"batch","messages":[{{"type":"user_joined","roomId":"x"}},{{"type":"message","roomId":"r","content":{a}}},{{"type":"message","content":{b}}}]}}"#
        );
        let mut seen = Vec::new();
        Scanner::new().scan(frame.as_bytes(), |m| {
            seen.push((m.publisher, m.room, m.seq, m.sent_us))
        });
        assert_eq!(seen, vec![(1, 2, 3, 4), (5, 6, 7, 8)]);
        assert_eq!(a.len(), 60);
    }
}
