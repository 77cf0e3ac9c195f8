//! One WebSocket connection: frames in to the session, the session's outbound frames out.

use std::time::Duration;

use fawkes_channel::{CloseReason, CloseSignal, Frame, Session};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame as WsFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Frames written per flush.
const BATCH: usize = 256;
/// Bytes of frames taken from the queue per flush (a larger frame goes alone). A write to a peer
/// that stopped reading holds what it took, besides the queue: small, so that a stalled reader
/// costs little more than the endpoint's `outbound_byte_limit`.
pub(crate) const BATCH_BYTES: usize = 64 * 1024;
/// How long a closing connection waits for the peer's answer to our close frame, and then for
/// the peer to end the TCP connection after ours.
const CLOSE_GRACE: Duration = Duration::from_secs(2);
/// How long a close frame may wait to be written to a peer that has stopped reading, and how
/// long a write in progress when the socket closes may still take. Longer than [`CLOSE_GRACE`]: a
/// slow consumer still reads what was sent before its 1008.
const CLOSE_WRITE_GRACE: Duration = Duration::from_secs(10);

type Sink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, Message>;
type Stream<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

/// How a connection ends.
enum End {
    /// The session ended: tell the peer why with a close frame.
    Server(CloseReason),
    /// The peer sent a close frame: answer it (tungstenite has queued the echo).
    Peer,
    /// The peer broke the protocol: tell it with this code (1002, 1007), then end.
    Violation(CloseCode, &'static str),
    /// The session ended while a write waited on a peer that does not read: nothing more can
    /// be written, so the connection is dropped.
    Stuck(CloseReason),
    /// The connection is gone or broken: nothing can be said.
    Gone,
}

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
    let closing = session.close_signal();
    let mut batch = Vec::new();
    // False once the peer's input cannot be read any further (a frame over the limit): the
    // session then ends and its reason is sent.
    let mut reading = true;

    let end = 'conn: loop {
        let frame = tokio::select! {
            sent = outbound.recv_many_within(&mut batch, BATCH, BATCH_BYTES) => match sent {
                Ok(_) => match Box::pin(send(&mut sink, &mut batch, &closing)).await {
                    Sent::Written => continue,
                    Sent::Failed => break 'conn End::Gone,
                    Sent::Stuck(reason) => break 'conn End::Stuck(reason),
                },
                Err(reason) => break 'conn End::Server(reason),
            },
            msg = stream.next(), if reading => match msg {
                Some(Ok(Message::Text(t))) => Frame::Text(t.into()),
                Some(Ok(Message::Binary(b))) => Frame::Binary(b),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                Some(Ok(Message::Close(_))) => break 'conn End::Peer,
                None => break 'conn End::Gone,
                Some(Err(WsError::Capacity(CapacityError::MessageTooLong { size, max_size }))) => {
                    session.close(CloseReason::FrameTooLarge { len: size, max: max_size });
                    reading = false;
                    continue;
                }
                Some(Err(e)) => {
                    tracing::debug!(socket = session.id(), error = %e, "websocket read failed");
                    match violation(&e) {
                        Some((code, why)) => break 'conn End::Violation(code, why),
                        None => break 'conn End::Gone,
                    }
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
                sent = outbound.recv_many_within(&mut batch, BATCH, BATCH_BYTES) => match sent {
                    Ok(_) => match Box::pin(send(&mut sink, &mut batch, &closing)).await {
                        Sent::Written => {}
                        Sent::Failed => break 'conn End::Gone,
                        Sent::Stuck(reason) => break 'conn End::Stuck(reason),
                    },
                    Err(reason) => break 'conn End::Server(reason),
                },
            }
        }
    };

    outbound.close(CloseReason::TransportClosed);
    // Boxed for the same reason as above: only a closing connection pays for the timers.
    let handshake_done = match end {
        End::Server(reason) => {
            tracing::debug!(socket = session.id(), %reason, "closing websocket");
            match close_code(&reason) {
                Some(code) => Box::pin(close(&mut sink, &mut stream, code, &reason)).await,
                None => false,
            }
        }
        End::Violation(code, why) => {
            tracing::info!(
                socket = session.id(),
                code = u16::from(code),
                why,
                "closing a websocket that broke the protocol"
            );
            Box::pin(send_close(&mut sink, CloseFrame { code, reason: Utf8Bytes::from_static(why) })).await
        }
        End::Peer => {
            tracing::debug!(socket = session.id(), "the peer closed the websocket");
            Box::pin(answer_close(&mut sink)).await
        }
        End::Stuck(reason) => {
            tracing::debug!(socket = session.id(), %reason, "dropping a websocket whose peer does not read");
            false
        }
        End::Gone => false,
    };
    // The close frames are exchanged: the socket is gone for the endpoint (a draining server may
    // exit now), and only the TCP connection remains to be ended.
    drop(session);
    if handshake_done {
        Box::pin(end_tcp(sink, stream)).await;
    }
}

/// Sends our close frame and waits briefly for the peer's answer. True once the peer has
/// answered (or its input has ended), false if it did not in time.
async fn close<S>(sink: &mut Sink<S>, stream: &mut Stream<S>, code: CloseCode, reason: &CloseReason) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame { code, reason: Utf8Bytes::from(short_reason(reason)) };
    match tokio::time::timeout(CLOSE_WRITE_GRACE, sink.send(Message::Close(Some(frame)))).await {
        Ok(Ok(())) => {
            // The peer's close frame ends the stream; anything it sends before that is dropped.
            let answered = tokio::time::timeout(CLOSE_GRACE, async { while let Some(Ok(_)) = stream.next().await {} });
            let answered = answered.await.is_ok();
            if !answered {
                tracing::debug!("the peer did not answer the close frame in time");
            }
            answered
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the close frame could not be sent");
            false
        }
        Err(_) => {
            tracing::debug!("the peer did not read the close frame in time");
            false
        }
    }
}

/// Sends our close frame to a peer whose input can no longer be read (it broke the protocol).
/// True once it is written: the peer's reply is not awaited, since nothing more it sends is read.
async fn send_close<S>(sink: &mut Sink<S>, frame: CloseFrame) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(CLOSE_WRITE_GRACE, sink.send(Message::Close(Some(frame)))).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the close frame could not be sent");
            false
        }
        Err(_) => {
            tracing::debug!("the peer did not read the close frame in time");
            false
        }
    }
}

/// The close code a read error calls for (RFC 6455 §7.4.1): 1002 for a frame that breaks the
/// protocol, 1007 for text that is not UTF-8; `None` when the connection itself failed.
fn violation(e: &WsError) -> Option<(CloseCode, &'static str)> {
    match e {
        WsError::Protocol(p) => Some(match p {
            ProtocolError::UnmaskedFrameFromClient => (CloseCode::Protocol, "unmasked frame"),
            ProtocolError::InvalidOpcode(_)
            | ProtocolError::UnknownControlFrameType(_)
            | ProtocolError::UnknownDataFrameType(_) => (CloseCode::Protocol, "reserved opcode"),
            ProtocolError::InvalidCloseSequence => (CloseCode::Protocol, "invalid close code"),
            ProtocolError::ResetWithoutClosingHandshake => return None,
            _ => (CloseCode::Protocol, "protocol error"),
        }),
        WsError::Utf8(_) => Some((CloseCode::Invalid, "invalid UTF-8")),
        WsError::Capacity(_) => Some((CloseCode::Size, "frame too large")),
        _ => None,
    }
}

/// Sends the answer to the peer's close frame (tungstenite has queued it, echoing the peer's
/// code). True once it is written.
async fn answer_close<S>(sink: &mut Sink<S>) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(CLOSE_WRITE_GRACE, sink.flush()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "the close answer could not be sent");
            false
        }
        Err(_) => {
            tracing::debug!("the peer did not read the close answer in time");
            false
        }
    }
}

/// Shuts down our side of the connection, then reads (and drops) what the peer still sends until
/// it closes too, for at most [`CLOSE_GRACE`]. Dropping a socket with unread input would reset
/// the connection, and a reset can destroy the close frame before the peer reads it.
async fn end_tcp<S>(sink: Sink<S>, stream: Stream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Ok(mut ws) = stream.reunite(sink) else { return };
    let io = ws.get_mut();
    let ended = tokio::time::timeout(CLOSE_GRACE, async {
        if io.shutdown().await.is_ok() {
            let mut scratch = [0u8; 512];
            while matches!(io.read(&mut scratch).await, Ok(n) if n > 0) {}
        }
    });
    if ended.await.is_err() {
        tracing::debug!("the peer did not end the connection in time");
    }
}

/// How [`send`] went.
enum Sent {
    Written,
    /// The connection failed.
    Failed,
    /// The socket closed, and the write then made no progress for [`CLOSE_WRITE_GRACE`].
    Stuck(CloseReason),
}

/// Writes `batch` ([`write`]). A write waits for the peer to read, so when the peer has stopped,
/// it would wait for ever, never seeing the socket close (a slow consumer is such a peer): once
/// `closing` fires, the write has [`CLOSE_WRITE_GRACE`] to finish. Boxed by its callers: held
/// inline, its timer would grow every idle connection's task.
async fn send<S>(sink: &mut Sink<S>, batch: &mut Vec<Frame>, closing: &CloseSignal) -> Sent
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let stuck = async {
        let reason = closing.closed().await;
        tokio::time::sleep(CLOSE_WRITE_GRACE).await;
        reason
    };
    tokio::select! {
        // A write that completes at once (the usual case) never arms the close signal.
        biased;
        written = write(sink, batch) => match written {
            Ok(()) => Sent::Written,
            Err(_) => Sent::Failed,
        },
        reason = stuck => Sent::Stuck(reason),
    }
}

/// Writes `batch` and flushes once. The batch's buffer is given back: kept, it would cost every
/// idle connection memory (most are idle most of the time), while allocating one per write costs
/// little next to the write's system call.
async fn write<S>(sink: &mut Sink<S>, batch: &mut Vec<Frame>) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for frame in std::mem::take(batch) {
        sink.feed(message(frame)).await?;
    }
    sink.flush().await
}

/// The WebSocket message for an outbound frame. A text frame goes out as a text-opcode frame as
/// it is: the serializer wrote it from a `String`, and one broadcast's frame is shared by every
/// subscriber, so checking it is UTF-8 again for each socket (which [`Utf8Bytes`] would) would
/// cost a pass over every byte sent.
fn message(frame: Frame) -> Message {
    match frame {
        Frame::Binary(b) => Message::Binary(b),
        Frame::Text(t) => {
            debug_assert!(std::str::from_utf8(&t).is_ok(), "an outbound text frame is not UTF-8");
            Message::Frame(WsFrame::message(t, OpCode::Data(Data::Text), true))
        }
    }
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
