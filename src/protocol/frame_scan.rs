//! Follows a stream of WebSocket frames (RFC 6455 section 5.2) as its bytes pass, reading
//! only the headers and counting payload bytes past, so it buffers nothing and costs a
//! few branches per frame: for code that watches bytes on their way to a frame parser
//! (the server's `FrameRules`, the load tool's wire counter). A header split across reads
//! is the normal case, not an edge.

/// A frame's header, once all of it has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// FIN, RSV1-3 and the opcode.
    pub first: u8,
    pub masked: bool,
    /// Payload bytes.
    pub len: u64,
}

impl FrameHead {
    /// Ping, pong or close.
    pub fn is_control(&self) -> bool {
        self.first & 0x08 != 0
    }
}

/// What the scan met, in stream order.
pub enum Scanned<'a> {
    /// A frame's first byte, before the rest of it: the watcher may rewrite it (take
    /// RSV1 off) before the parser sees it.
    First(&'a mut u8),
    /// A frame's header is complete (mask key included).
    Head(FrameHead),
    /// A frame's last payload byte has passed, or its header if it has no payload.
    End,
}

/// Where in the frame stream the bytes seen so far end.
#[derive(Default)]
pub struct FrameScan {
    /// Header bytes of the current frame so far: 2, up to 8 of length, up to 4 of mask.
    head: [u8; 14],
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload_left: u64,
}

impl FrameScan {
    /// Follows `bytes`, the next bytes of the stream, telling `on` what it meets.
    pub fn scan(&mut self, mut bytes: &mut [u8], mut on: impl FnMut(Scanned<'_>)) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let skip = self.payload_left.min(bytes.len() as u64) as usize;
                self.payload_left -= skip as u64;
                bytes = &mut bytes[skip..];
                if self.payload_left == 0 {
                    on(Scanned::End);
                }
                continue;
            }
            if self.have == 0 {
                on(Scanned::First(&mut bytes[0]));
            }
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &mut bytes[1..];
            if self.have < 2 {
                continue;
            }
            let masked = self.head[1] & 0x80 != 0;
            let ext = match self.head[1] & 0x7f {
                126 => 2,
                127 => 8,
                _ => 0,
            };
            if self.have < 2 + ext + if masked { 4 } else { 0 } {
                continue;
            }
            let len = match ext {
                0 => u64::from(self.head[1] & 0x7f),
                2 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                _ => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.head[2..10]);
                    u64::from_be_bytes(b)
                }
            };
            self.have = 0;
            self.payload_left = len;
            on(Scanned::Head(FrameHead {
                first: self.head[0],
                masked,
                len,
            }));
            if len == 0 {
                on(Scanned::End);
            }
        }
    }

    /// Part of a frame has passed, not all of it.
    pub fn mid_frame(&self) -> bool {
        self.have > 0 || self.payload_left > 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_split_anywhere_give_the_same_frames() {
        let mut stream = vec![0x81, 0x83, 1, 2, 3, 4, b'a', b'b', b'c']; // masked text "abc"
        stream.extend([0x82, 126, 0x01, 0x00]); // binary, 256 bytes, 16-bit length
        stream.extend([0u8; 256]);
        stream.extend([0x89, 0x00]); // empty ping
        for chunk in [1, 2, 3, 7, stream.len()] {
            let mut scan = FrameScan::default();
            let (mut firsts, mut heads, mut ends) = (Vec::new(), Vec::new(), 0);
            let mut bytes = stream.clone();
            for part in bytes.chunks_mut(chunk) {
                scan.scan(part, |event| match event {
                    Scanned::First(first) => firsts.push(*first),
                    Scanned::Head(head) => heads.push((head.masked, head.len, head.is_control())),
                    Scanned::End => ends += 1,
                });
            }
            assert_eq!(firsts, [0x81, 0x82, 0x89], "chunks of {chunk}");
            assert_eq!(
                heads,
                [(true, 3, false), (false, 256, false), (false, 0, true)]
            );
            assert_eq!(ends, 3);
            assert!(!scan.mid_frame());
        }
    }
}
