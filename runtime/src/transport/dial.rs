//! Reconnecting clients' shared rule for dialing: one connect attempt at a time, and the
//! callers that queued behind an attempt that failed get its error rather than trying
//! again one after another, so no call waits much longer than one connect timeout.

use std::future::Future;

use tokio::time::Instant;

use crate::ServeError;

#[derive(Default)]
pub(crate) struct DialGate {
    /// When and how the last attempt failed.
    last_failure: tokio::sync::Mutex<Option<(Instant, ServeError)>>,
}

impl DialGate {
    /// The connection `live` finds, or the one `dial` makes (which must also make `live`
    /// find it), or the error of an attempt that failed while this caller waited.
    pub(crate) async fn connect<C, F>(
        &self,
        live: impl Fn() -> Option<C>,
        dial: impl FnOnce() -> F,
    ) -> Result<C, ServeError>
    where
        F: Future<Output = Result<C, ServeError>>,
    {
        if let Some(conn) = live() {
            return Ok(conn);
        }
        let asked = Instant::now();
        let mut last_failure = self.last_failure.lock().await;
        if let Some(conn) = live() {
            return Ok(conn);
        }
        if let Some((at, error)) = last_failure.as_ref() {
            if *at >= asked {
                return Err(error.clone());
            }
        }
        match dial().await {
            Ok(conn) => {
                *last_failure = None;
                Ok(conn)
            }
            Err(e) => {
                *last_failure = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }
}
