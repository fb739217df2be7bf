//! Runs a handler's engine requests and merges their events into one channel.
//!
//! Each request's [`RequestStream`] lives in a small task that forwards its events; when the
//! handler's receiver goes away (the client disconnected), the task drops the stream at once,
//! which cancels the request and frees its KV blocks.

use super::error::ApiError;
use crate::engine::{Engine, Event, Request};
use std::sync::Arc;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// Submits every request (all or none); events arrive tagged with their request's position.
pub fn launch(
    engine: &Arc<Engine>,
    requests: Vec<Request>,
) -> Result<UnboundedReceiver<(usize, Event)>, ApiError> {
    let mut streams = Vec::with_capacity(requests.len());
    for r in requests {
        // On an error the streams already made are dropped here, cancelling them.
        streams.push(engine.submit(r)?);
    }
    let (tx, rx) = unbounded_channel();
    for (i, mut stream) in streams.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    ev = stream.recv() => match ev {
                        Some(ev) => {
                            let last = matches!(ev, Event::Done(_) | Event::Error(_));
                            if tx.send((i, ev)).is_err() || last {
                                break;
                            }
                        }
                        None => {
                            let _ = tx.send((i, Event::Error("the engine stopped".into())));
                            break;
                        }
                    },
                    _ = tx.closed() => break,
                }
            }
        });
    }
    Ok(rx)
}
