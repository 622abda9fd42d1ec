//! Response bodies in serve mode stream: the client gets each chunk as it
//! arrives from the upstream. [`ResponseBody`] is a whole body or a stream;
//! [`Tee`] reads an answer being stored, keeping a copy for the entry (up
//! to `cache.max_entry_bytes`) while the client is sent what it takes.
//!
//! Memory: a body relayed without being stored is read only as fast as its
//! client takes it (a few chunks in flight), so a client that stops reading
//! holds socket buffers, not the body. A body being stored is read as fast
//! as the upstream sends it, whatever the client's pace: its copy is
//! bounded by the entry limit, and past it the copy is dropped and the
//! rest is relayed at the client's pace.

use std::collections::VecDeque;
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::upstream::{BodyReader, UpstreamBody, UpstreamError};

/// A body as it goes to the client.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, UpstreamError>> + Send>>;

/// A client response body: whole, or still arriving.
pub enum ResponseBody {
    Full(Bytes),
    Streaming(BodyStream),
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResponseBody::Full(b) => f.debug_tuple("Full").field(&b.len()).finish(),
            ResponseBody::Streaming(_) => f.write_str("Streaming"),
        }
    }
}

impl Default for ResponseBody {
    fn default() -> Self {
        ResponseBody::Full(Bytes::new())
    }
}

impl From<Bytes> for ResponseBody {
    fn from(b: Bytes) -> Self {
        ResponseBody::Full(b)
    }
}

impl From<UpstreamBody> for ResponseBody {
    fn from(body: UpstreamBody) -> Self {
        match body {
            UpstreamBody::Full(b) => ResponseBody::Full(b),
            UpstreamBody::Streaming(reader) => ResponseBody::Streaming(Box::pin(
                futures_util::stream::unfold(Some(reader), |reader| async move {
                    let mut reader = reader?;
                    match reader.next().await {
                        Ok(Some(chunk)) => Some((Ok(chunk), Some(reader))),
                        Ok(None) => None,
                        // The error ends the stream (and the client's
                        // connection: its response cannot be completed).
                        Err(e) => Some((Err(e), None)),
                    }
                }),
            )),
        }
    }
}

impl ResponseBody {
    /// The whole body, when it is not a stream.
    pub fn as_full(&self) -> Option<&Bytes> {
        match self {
            ResponseBody::Full(b) => Some(b),
            ResponseBody::Streaming(_) => None,
        }
    }

    /// The whole body, a stream read to its end.
    pub async fn collect(self) -> Result<Bytes, UpstreamError> {
        match self {
            ResponseBody::Full(b) => Ok(b),
            ResponseBody::Streaming(mut s) => {
                use futures_util::StreamExt;
                let mut body = BytesMut::new();
                while let Some(chunk) = s.next().await {
                    body.extend_from_slice(&chunk?);
                }
                Ok(body.freeze())
            }
        }
    }

    /// A stream fed through a channel.
    fn from_channel(rx: mpsc::Receiver<Result<Bytes, UpstreamError>>) -> Self {
        ResponseBody::Streaming(Box::pin(futures_util::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        )))
    }
}

/// Chunks queued for the client beyond those it is taking: with a body
/// not being kept, this (and the socket buffers) is all a slow client holds.
const CHANNEL_CHUNKS: usize = 4;

/// How a teed body ended.
pub(super) enum TeeEnd {
    /// Read whole within the entry limit: the copy to store, and what is
    /// left to send, held until it is stored ([`Rest::send`]).
    Kept(Bytes, Rest),
    /// Longer than the entry limit: no copy; the rest goes on to the client.
    TooLarge,
    /// The client went away and nothing is being kept.
    Abandoned,
}

/// The last chunks of a kept body, held back until the entry is written:
/// a client that has read the whole answer then finds it stored.
pub(super) struct Rest(Tee);

impl Rest {
    /// Send them (in a task of their own).
    pub(super) fn send(self) {
        self.0.forward_rest(None, None);
    }
}

/// An upstream body being read for an entry and sent to a client at once.
pub(super) struct Tee {
    tx: mpsc::Sender<Result<Bytes, UpstreamError>>,
    pending: VecDeque<Bytes>,
    client: bool,
}

impl Tee {
    /// A tee and the body the client reads from it.
    pub(super) fn new() -> (Tee, ResponseBody) {
        let (tx, rx) = mpsc::channel(CHANNEL_CHUNKS);
        let tee = Tee {
            tx,
            pending: VecDeque::new(),
            client: true,
        };
        (tee, ResponseBody::from_channel(rx))
    }

    /// Read `reader` to its end, keeping a copy while it stays within
    /// `keep_limit` bytes and sending every chunk to the client as fast as
    /// it takes them. Reading never waits for the client while a copy is
    /// kept. An upstream failure ends the client's body with it and is
    /// returned. What is left for the client when the copy ends (stored,
    /// or dropped as too large) goes on in a task of its own, so whoever
    /// waits for the entry need not wait for a slow client; after a kept
    /// body, once the caller has stored it.
    pub(super) async fn run(
        mut self,
        mut reader: BodyReader,
        keep_limit: usize,
    ) -> Result<TeeEnd, UpstreamError> {
        let mut kept: Vec<Bytes> = Vec::new();
        let mut kept_len = 0usize;
        let mut last = None;
        let end = loop {
            let read = tokio::select! {
                biased;
                permit = self.tx.reserve(), if self.client && !self.pending.is_empty() => {
                    match permit {
                        Ok(permit) => permit.send(Ok(self.pending.pop_front().expect("not empty"))),
                        Err(_) => {
                            // The client went away; the copy goes on.
                            self.client = false;
                            self.pending.clear();
                        }
                    }
                    continue;
                }
                chunk = reader.next() => chunk,
            };
            match read {
                Ok(Some(chunk)) if kept_len + chunk.len() > keep_limit => {
                    if !self.client {
                        return Ok(TeeEnd::Abandoned);
                    }
                    self.pending.push_back(chunk);
                    break Ok(TeeEnd::TooLarge);
                }
                Ok(Some(chunk)) => {
                    kept_len += chunk.len();
                    kept.push(chunk.clone());
                    if Some(kept_len) == reader.content_length() {
                        // The client knows the length: it would be done
                        // with this chunk before the entry is stored.
                        last = Some(chunk);
                    } else if self.client {
                        self.pending.push_back(chunk);
                    }
                }
                Ok(None) => {
                    if self.client {
                        self.pending.extend(last.take());
                    }
                    let mut body = BytesMut::with_capacity(kept_len);
                    for chunk in kept.drain(..) {
                        body.extend_from_slice(&chunk);
                    }
                    return Ok(TeeEnd::Kept(body.freeze(), Rest(self)));
                }
                Err(e) => break Err(e),
            }
        };
        match &end {
            Ok(TeeEnd::TooLarge) => self.forward_rest(Some(reader), None),
            Err(e) => {
                let e = e.clone();
                self.forward_rest(None, Some(e))
            }
            _ => {}
        }
        end
    }

    /// Send what is pending, then the rest of `reader` (at the client's
    /// pace), then `error`, in a task of its own.
    fn forward_rest(self, reader: Option<BodyReader>, error: Option<UpstreamError>) {
        if !self.client {
            return;
        }
        let Tee { tx, pending, .. } = self;
        tokio::spawn(async move {
            for chunk in pending {
                if tx.send(Ok(chunk)).await.is_err() {
                    return;
                }
            }
            if let Some(mut reader) = reader {
                loop {
                    match reader.next().await {
                        Ok(Some(chunk)) => {
                            if tx.send(Ok(chunk)).await.is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    }
                }
            }
            if let Some(e) = error {
                let _ = tx.send(Err(e)).await;
            }
        });
    }
}
