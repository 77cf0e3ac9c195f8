//! One WebSocket connection: frames in to the session, the session's outbound frames out.

use std::time::Duration;

use fawkes_channel::{CloseReason, Frame, Session};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames written per flush.
const BATCH: usize = 256;
/// How long to wait for the peer's close frame after sending ours.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

type Sink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, Message>;
type Stream<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

/// Drives one connection to its end. Generic over the I/O, so it runs on hyper's upgraded
/// connection, a TLS stream or an in-memory duplex alike.
pub(crate) fn run<S>(ws: WebSocketStream<S>, session: Session) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Split before the future is made, so the stream is not also kept in the future's state.
    let (sink, stream) = ws.split();
    drive(sink, stream, session)
}

async fn drive<S>(mut sink: Sink<S>, mut stream: Stream<S>, mut session: Session)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut outbound = session.outbound();
    let mut batch = Vec::new();

    let reason = 'conn: loop {
        let frame = tokio::select! {
            sent = outbound.recv_many(&mut batch, BATCH) => match sent {
                Ok(_) => {
                    if write(&mut sink, &mut batch).await.is_err() {
                        break 'conn None;
                    }
                    continue;
                }
                Err(reason) => break 'conn Some(reason),
            },
            msg = stream.next() => match msg {
                Some(Ok(Message::Text(t))) => Frame::Text(t.into()),
                Some(Ok(Message::Binary(b))) => Frame::Binary(b),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) | None => break 'conn None,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    session.close(CloseReason::FrameTooLarge { len: size, max: max_size });
                    continue;
                }
                Some(Err(e)) => {
                    tracing::debug!(socket = session.id(), error = %e, "websocket read failed");
                    break 'conn None;
                }
            },
        };
        // While the session waits (a channel's mailbox is full), keep the peer's frames flowing out.
        // Boxed: held inline, this future would double what every idle connection's task costs.
        let mut handled = Box::pin(session.handle_frame(frame));
        loop {
            tokio::select! {
                result = &mut handled => {
                    if result.is_err() {
                        // The session closed itself; the outbound side now drains and ends with the reason.
                    }
                    break;
                }
                sent = outbound.recv_many(&mut batch, BATCH) => match sent {
                    Ok(_) => {
                        if write(&mut sink, &mut batch).await.is_err() {
                            break 'conn None;
                        }
                    }
                    Err(reason) => break 'conn Some(reason),
                },
            }
        }
    };

    outbound.close(CloseReason::TransportClosed);
    if let Some(reason) = reason {
        tracing::debug!(socket = session.id(), %reason, "closing websocket");
        if let Some(code) = close_code(&reason) {
            // Boxed for the same reason as above: only a closing connection pays for the timer.
            Box::pin(close(&mut sink, &mut stream, code, &reason)).await;
        }
    }
    drop(session);
}

/// Sends the close frame and waits briefly for the peer's, so the TCP connection ends cleanly.
async fn close<S>(sink: &mut Sink<S>, stream: &mut Stream<S>, code: CloseCode, reason: &CloseReason)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame { code, reason: Utf8Bytes::from(short_reason(reason)) };
    if sink.send(Message::Close(Some(frame))).await.is_ok() {
        let _ = tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = stream.next().await {} }).await;
    }
}

async fn write<S>(sink: &mut Sink<S>, batch: &mut Vec<Frame>) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for frame in batch.drain(..) {
        let msg = match frame {
            Frame::Binary(b) => Message::Binary(b),
            Frame::Text(t) => match Utf8Bytes::try_from(t) {
                Ok(text) => Message::Text(text),
                Err(_) => {
                    tracing::error!("dropping an outbound text frame that is not UTF-8");
                    continue;
                }
            },
        };
        sink.feed(msg).await?;
    }
    sink.flush().await
}

fn close_code(reason: &CloseReason) -> Option<CloseCode> {
    Some(match reason {
        CloseReason::HeartbeatTimeout | CloseReason::Disconnected => CloseCode::Normal,
        CloseReason::Shutdown => CloseCode::Away,
        CloseReason::SlowConsumer => CloseCode::Policy,
        CloseReason::FrameTooLarge { .. } => CloseCode::Size,
        CloseReason::Malformed(_) => CloseCode::Error,
        CloseReason::TransportClosed => return None,
        _ => CloseCode::Normal,
    })
}

/// A close frame's reason must fit in 123 bytes.
fn short_reason(reason: &CloseReason) -> String {
    let mut s = match reason {
        CloseReason::Malformed(_) => "malformed frame".to_owned(),
        other => other.to_string(),
    };
    s.truncate(123);
    s
}
