//! permessage-deflate (RFC 7692): the offer a client makes on the upgrade, what volley
//! answers, and the two transforms: a server frame compressed (once, then shared by every
//! compressing subscriber) and a client message inflated under the size limit.
//!
//! volley always answers with `server_no_context_takeover` and
//! `client_no_context_takeover`: every message is compressed on its own, so one
//! compressed frame is valid for every socket, and no socket keeps a compressor or an
//! inflate window between messages (a thread keeps one of each, reset per message).
//!
//! A leaf: it imports only `protocol` (frame headers).

use std::cell::RefCell;

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

use crate::protocol::outbound::{write_header, MAX_HEADER, OPCODE_TEXT};

/// What volley answers to an acceptable offer.
pub const RESPONSE: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

/// The four bytes a sync flush ends with, left off on the wire (RFC 7692 7.2.1).
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Whether a `Sec-WebSocket-Extensions` header (all of them, joined with commas) holds a
/// permessage-deflate offer volley can accept: known parameters, each at most once, and
/// no `server_max_window_bits` below 15 (volley compresses with the full window).
pub fn accepts(offers: &str) -> bool {
    offers.split(',').any(|offer| {
        let mut parts = offer.split(';').map(str::trim);
        if !parts
            .next()
            .is_some_and(|name| name.eq_ignore_ascii_case("permessage-deflate"))
        {
            return false;
        }
        let mut seen: Vec<String> = Vec::new();
        parts.all(|param| {
            let (name, value) = match param.split_once('=') {
                Some((n, v)) => (
                    n.trim().to_ascii_lowercase(),
                    Some(v.trim().trim_matches('"')),
                ),
                None => (param.to_ascii_lowercase(), None),
            };
            if seen.contains(&name) {
                return false;
            }
            let ok = match (name.as_str(), value) {
                ("server_no_context_takeover" | "client_no_context_takeover", None) => true,
                ("client_max_window_bits", None) => true,
                ("client_max_window_bits", Some(bits)) => window_bits(bits).is_some(),
                ("server_max_window_bits", Some(bits)) => window_bits(bits) == Some(15),
                _ => false,
            };
            seen.push(name);
            ok
        })
    })
}

fn window_bits(value: &str) -> Option<u8> {
    value.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
}

thread_local! {
    static COMPRESS: RefCell<Option<(u32, Compress)>> = const { RefCell::new(None) };
    static DECOMPRESS: RefCell<Option<Decompress>> = const { RefCell::new(None) };
}

/// A text frame (`frame`: header + payload, as volley encodes them) compressed: RSV1 set,
/// the payload deflated on its own, without the sync-flush tail.
pub fn compress_frame(frame: &Bytes, level: u32) -> Bytes {
    let payload = payload_of(frame);
    COMPRESS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let compress = match &mut *cell {
            Some((l, c)) if *l == level => {
                c.reset();
                c
            }
            slot => {
                &mut slot
                    .insert((level, Compress::new(Compression::new(level), false)))
                    .1
            }
        };
        let mut out = Vec::with_capacity(MAX_HEADER + payload.len() / 2 + 64);
        out.resize(MAX_HEADER, 0);
        loop {
            if out.capacity() - out.len() < 64 {
                out.reserve(out.capacity().max(256));
            }
            let consumed = compress.total_in() as usize;
            if compress
                .compress_vec(&payload[consumed..], &mut out, FlushCompress::Sync)
                .is_err()
            {
                // Only a broken stream state fails; send the frame plain.
                return frame.clone();
            }
            // All input taken, and the flush ended with room to spare: all output out.
            if compress.total_in() as usize == payload.len() && out.len() < out.capacity() {
                break;
            }
        }
        if out.ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        let len = out.len() - MAX_HEADER;
        let mut header = [0u8; MAX_HEADER];
        let h = write_header(&mut header, OPCODE_TEXT, len);
        header[0] |= 0x40; // RSV1: compressed
        out[MAX_HEADER - h..MAX_HEADER].copy_from_slice(&header[..h]);
        Bytes::from(out).slice(MAX_HEADER - h..)
    })
}

/// The payload of a server frame (unmasked; RFC 6455 length encoding).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let h = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(h..).unwrap_or_default()
}

/// Why a compressed client message could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum InflateError {
    /// It inflates to more than the limit.
    TooBig,
    /// Not a deflate stream.
    Corrupt,
}

/// A client message's payload inflated, at most `limit` bytes of it.
pub fn inflate(payload: &[u8], limit: usize) -> Result<Vec<u8>, InflateError> {
    let mut input = Vec::with_capacity(payload.len() + TAIL.len());
    input.extend_from_slice(payload);
    input.extend_from_slice(&TAIL);
    DECOMPRESS.with(|cell| {
        let mut cell = cell.borrow_mut();
        let inflater = cell.get_or_insert_with(|| Decompress::new(false));
        inflater.reset(false);
        let mut out: Vec<u8> = Vec::with_capacity((payload.len() * 3).clamp(64, limit + 1));
        loop {
            if out.capacity() - out.len() < 64 {
                // Room for one byte past the limit, to see it passed.
                let more = out
                    .capacity()
                    .max(256)
                    .min(limit + 1 - out.len().min(limit));
                out.reserve(more.max(64));
            }
            let before = (inflater.total_in(), inflater.total_out());
            let consumed = before.0 as usize;
            let status = inflater
                .decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            if out.len() > limit {
                return Err(InflateError::TooBig);
            }
            let all_in = inflater.total_in() as usize == input.len();
            if matches!(status, Status::StreamEnd) || (all_in && out.len() < out.capacity()) {
                return Ok(out);
            }
            if (inflater.total_in(), inflater.total_out()) == before && out.len() < out.capacity() {
                // No progress with input and room left: not a deflate stream.
                return Err(InflateError::Corrupt);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Encoded;

    #[test]
    fn offers_volley_can_take() {
        assert!(accepts("permessage-deflate"));
        assert!(accepts("permessage-deflate; client_max_window_bits"));
        assert!(accepts(
            "x-webkit-deflate-frame, permessage-deflate; client_max_window_bits=10"
        ));
        assert!(accepts(
            "permessage-deflate; server_max_window_bits=15; client_no_context_takeover"
        ));
        assert!(!accepts("permessage-deflate; server_max_window_bits=10"));
        assert!(!accepts(
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover"
        ));
        assert!(!accepts("permessage-deflate; mystery"));
        assert!(!accepts("x-webkit-deflate-frame"));
        assert!(!accepts(""));
    }

    #[test]
    fn a_compressed_frame_inflates_back_to_its_payload() {
        let json = format!(r#"{{"type":"message","content":"{}"}}"#, "abc".repeat(5000));
        let frame = Encoded::from_json(json.as_bytes());
        let compressed = compress_frame(frame.frame(), 1);
        assert_eq!(compressed[0], 0xC1, "FIN, RSV1, text");
        let payload = payload_of(&compressed);
        assert!(payload.len() < json.len() / 10, "{} bytes", payload.len());
        assert_eq!(inflate(payload, 1 << 20).unwrap(), json.as_bytes());
        // Each message on its own: compressing again gives the same bytes.
        assert_eq!(compress_frame(frame.frame(), 1), compressed);
    }

    #[test]
    fn inflating_stops_at_the_limit_and_refuses_garbage() {
        let json = "x".repeat(100_000);
        let frame = Encoded::from_json(json.as_bytes());
        let compressed = compress_frame(frame.frame(), 6);
        let payload = payload_of(&compressed);
        assert_eq!(inflate(payload, 99_999), Err(InflateError::TooBig));
        assert_eq!(inflate(payload, 100_000).unwrap().len(), 100_000);
        assert_eq!(
            inflate(&[0xff, 0xff, 0xff, 0x00, 0x12], 1000),
            Err(InflateError::Corrupt)
        );
    }
}
