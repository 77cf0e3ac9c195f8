//! Asking the server to close the connection a response goes out on.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

/// A response extension by which a transport asks the server to close the connection that the
/// response is being sent on.
///
/// A streamed body (an SSE stream) is polled only when the connection can write. When its peer
/// stops reading, the body never learns that its session has ended, and the connection, with
/// everything the HTTP layer buffered for it, stays open until the peer goes away. So the
/// transport puts a `ConnectionCut` in the response's extensions and cuts it when the stream ends
/// (its session closed, or a newer stream replaced it); the server closes the connection.
///
/// `fawkes serve` (`fawkes_server::serve_with`) honours it: once the response's cut fires, the
/// connection reads no further request, the response has a short grace to finish (a peer that
/// reads gets the stream's last event), then the connection is dropped. A server that does not
/// look for it (plain `axum::serve`, hyper on its own) leaves such a connection open until the
/// peer's TCP connection fails or times out.
///
/// ```
/// use fawkes_http::ConnectionCut;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // The transport attaches it to its streamed response...
/// let cut = ConnectionCut::new();
/// let mut res = http::Response::new(());
/// res.extensions_mut().insert(cut.clone());
///
/// // ...and cuts it when the stream has ended, read or not.
/// cut.cut();
///
/// // The server waits on the response's cut beside the connection, and closes it.
/// let seen = res.extensions().get::<ConnectionCut>().cloned();
/// if let Some(seen) = seen {
///     seen.wait().await;
///     assert!(seen.is_cut());
/// }
/// # }
/// ```
#[derive(Clone, Default)]
pub struct ConnectionCut(Arc<CutState>);

#[derive(Default)]
struct CutState {
    cut: AtomicBool,
    notify: Notify,
}

impl fmt::Debug for ConnectionCut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionCut").field("cut", &self.is_cut()).finish()
    }
}

impl ConnectionCut {
    /// A cut not yet made.
    pub fn new() -> ConnectionCut {
        ConnectionCut::default()
    }

    /// Asks for the connection to be closed. Idempotent.
    pub fn cut(&self) {
        self.0.cut.store(true, Ordering::Release);
        self.0.notify.notify_waiters();
    }

    /// Whether [`ConnectionCut::cut`] was called.
    pub fn is_cut(&self) -> bool {
        self.0.cut.load(Ordering::Acquire)
    }

    /// Waits until the cut is made. Cancel-safe.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.is_cut() {
                return;
            }
            notified.await;
        }
    }

    /// Same cut (clones of one another).
    pub fn same(&self, other: &ConnectionCut) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn waiters_before_and_after_the_cut_are_told() {
        let cut = ConnectionCut::new();
        let early = tokio::spawn({
            let cut = cut.clone();
            async move { cut.wait().await }
        });
        tokio::task::yield_now().await;
        assert!(!early.is_finished() && !cut.is_cut());
        cut.cut();
        assert!(tokio::time::timeout(Duration::from_secs(1), early).await.is_ok(), "the early waiter is woken");
        assert!(tokio::time::timeout(Duration::from_secs(1), cut.wait()).await.is_ok(), "a late one returns at once");
        assert!(cut.same(&cut.clone()) && !cut.same(&ConnectionCut::new()));
    }
}
