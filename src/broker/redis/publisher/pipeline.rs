//! One window's pipeline: which commands carry which envelopes.

use std::collections::VecDeque;
use std::ops::Range;

use indexmap::IndexMap;

use super::super::{board, durable};
use super::Publisher;
use crate::broker::{Envelope, Kind, Target};
use crate::config::{Durability, EnvelopeMode};

/// One window's pipeline and which envelopes each of its commands carries.
pub(super) struct Built {
    pub(super) pipe: redis::Pipeline,
    /// Each command's channel.
    pub(super) channels: Vec<String>,
    /// Indices into `pending`, command after command.
    pub(super) members: Vec<usize>,
    /// Each command's part of `members`.
    pub(super) spans: Vec<Range<usize>>,
    /// The envelopes at the front of `pending` the pipeline carries.
    pub(super) used: usize,
    /// Sent in check mode (durable messages sent before without an answer).
    pub(super) check: bool,
}

impl Publisher {
    pub(super) fn channel(&self, envelope: &Envelope) -> String {
        match &envelope.target {
            Target::Room(room) => self.core.keys.room(room),
            Target::Broadcast => self.core.keys.broadcast.clone(),
            Target::User(user) => self.core.keys.user(user),
        }
    }

    /// One pipeline from the front of `pending`: the pipeline, the channel of each of its
    /// commands, and how many envelopes it carries. Plain messages: one `PUBLISH` per
    /// channel (per `max_envelope_messages`) in `batch` mode, one per message in `single`
    /// mode. A durable room's messages: one script call per room per window (see
    /// `durable`), which publishes them in either shape.
    /// With `recheck > 0`, only those first ones, in check mode.
    pub(super) fn build(&self, pending: &VecDeque<Envelope>, recheck: usize) -> Built {
        let check = recheck > 0;
        let limit = if check { recheck } else { pending.len() };
        let mut pipe = redis::pipe();
        // Each command's reply on its own: a command Redis refused did not run and can be
        // kept (or handed back in a cluster) while the others count as sent.
        pipe.ignore_errors();
        let single = self.mode == EnvelopeMode::Single;
        // Groups in order of first appearance, messages in publish order within each.
        // Keyed by channel, durability and board: a state room's messages go in a call of
        // their own.
        let mut groups: IndexMap<(String, bool, bool), Vec<usize>> = IndexMap::new();
        let mut commands = 0;
        let mut used = 0;
        for (i, envelope) in pending.iter().take(limit).enumerate() {
            let key = (
                self.channel(envelope),
                durability(envelope).is_some(),
                envelope.board.is_some(),
            );
            let group = groups.get(&key).map_or(0, Vec::len);
            let new_command = if single && !key.1 {
                true
            } else {
                group.is_multiple_of(self.max_envelope_messages)
            };
            if new_command {
                if commands == self.max_pipeline {
                    break;
                }
                commands += 1;
            }
            groups.entry(key).or_default().push(i);
            used = i + 1;
        }
        let mut channels = Vec::with_capacity(commands);
        let mut members = Vec::with_capacity(used);
        let mut spans = Vec::with_capacity(commands);
        for ((channel, _, _), indices) in groups {
            let per_command = if single && durability(&pending[indices[0]]).is_none() {
                1
            } else {
                self.max_envelope_messages
            };
            for chunk in indices.chunks(per_command) {
                let first = &pending[chunk[0]];
                let append = |room, durability| durable::Append {
                    core: &self.core,
                    room,
                    durability,
                    head: self.writer.head(),
                    mode: durable::Mode { single, check },
                };
                match (durability(first), &first.target) {
                    (Some(durability), Target::Room(room)) if first.board.is_some() => {
                        board::add_publish(
                            &mut pipe,
                            &append(room, durability),
                            chunk.iter().filter_map(|&i| {
                                let e = &pending[i];
                                e.board.as_ref().map(|write| (&e.payload, write))
                            }),
                        )
                    }
                    (Some(durability), Target::Room(room)) => durable::add_publish(
                        &mut pipe,
                        &append(room, durability),
                        chunk.iter().map(|&i| pending[i].payload.json().to_vec()),
                    ),
                    _ if chunk.len() == 1 => {
                        pipe.cmd(self.core.publish_command())
                            .arg(&channel)
                            .arg(self.writer.single(first.payload.json()));
                    }
                    _ => {
                        let message = self
                            .writer
                            .batch(chunk.iter().map(|&i| pending[i].payload.json()));
                        pipe.cmd(self.core.publish_command())
                            .arg(&channel)
                            .arg(message);
                    }
                }
                channels.push(channel.clone());
                spans.push(members.len()..members.len() + chunk.len());
                members.extend_from_slice(chunk);
            }
        }
        Built {
            pipe,
            channels,
            members,
            spans,
            used,
            check,
        }
    }
}

/// A durable room's message: how long its history is kept.
pub(super) fn durability(envelope: &Envelope) -> Option<Durability> {
    match envelope.kind {
        Kind::Durable(durability) => Some(durability),
        _ => None,
    }
}
