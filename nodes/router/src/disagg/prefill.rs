//! The prefill step of a disaggregated request: choose a prefill worker, call it, wait for
//! its one [`PrefillResult`], and replace it once if it turns out to be gone.

use std::pin::pin;
use std::sync::Arc;

use dynamo_protocol::{PrefillRequest, PrefillResult, TokenRequest};
use dynamo_runtime::{ErrorKind, InstanceId, InstanceSet, RequestContext, ServeError};
use futures::future::{select, Either};
use futures::StreamExt;

use crate::policy::{Policy, RequestTracker};
use crate::stream::LoadGuard;
use crate::table::{Loads, Pick};

/// The router's `prefill` output port: its live workers, how one is chosen, and their
/// in-flight counters.
pub(crate) struct PrefillPort {
    pub set: Arc<InstanceSet<PrefillRequest, PrefillResult>>,
    pub policy: Arc<dyn Policy>,
    pub loads: Loads<PrefillRequest, PrefillResult>,
}

/// How a prefill step ended.
pub(crate) enum Outcome {
    /// The blocks are on the decode worker.
    Done {
        instance: InstanceId,
        result: PrefillResult,
    },
    /// No prefill worker was live, or every one tried was gone (`last` says why).
    NoWorker { last: Option<ServeError> },
    /// The prefill worker answered with an error other than `Unavailable`.
    Failed {
        instance: InstanceId,
        error: ServeError,
    },
    /// The caller cancelled the request.
    Cancelled,
}

/// What the step calls the chosen workers with.
pub(crate) struct Job<'a> {
    pub request: &'a TokenRequest,
    pub handoff_id: &'a str,
    pub decode_instance: InstanceId,
    pub ctx: &'a RequestContext,
    pub span: &'a tracing::Span,
}

impl PrefillPort {
    pub fn new(
        set: Arc<InstanceSet<PrefillRequest, PrefillResult>>,
        policy: Arc<dyn Policy>,
    ) -> Self {
        PrefillPort {
            set,
            policy,
            loads: Loads::new(),
        }
    }

    /// Runs the step; `retried` is told when the first worker was replaced.
    pub async fn run(&self, job: Job<'_>, retried: impl FnOnce()) -> Outcome {
        let Some(mut pick) = self
            .loads
            .pick(&self.set, self.policy.as_ref(), job.request)
        else {
            return Outcome::NoWorker { last: None };
        };
        // The policy's account of the prefill (a KV policy's predicted blocks and load),
        // told of the result and dropped with the step.
        let mut tracker = pick.tracker.take();
        let first = pick.id;
        job.span.record("prefill_instance", first);
        let error = match self.attempt(pick, &job).await {
            Ok(result) => return done(first, result, tracker.as_mut()),
            Err(error) => error,
        };
        if error.kind != ErrorKind::Unavailable {
            return failed(first, error, job.ctx);
        }
        if job.ctx.is_cancelled() {
            return Outcome::Cancelled;
        }
        let Some(other) = self.loads.pick_other(&self.set, first) else {
            return Outcome::NoWorker { last: Some(error) };
        };
        tracing::debug!(failed = first, next = other.id, %error, "prefill worker unavailable; retrying");
        retried();
        job.span.record("prefill_retried_from", first);
        job.span.record("prefill_instance", other.id);
        if let Some(t) = tracker.as_mut() {
            t.moved_to(other.id);
        }
        let id = other.id;
        match self.attempt(other, &job).await {
            Ok(result) => done(id, result, tracker.as_mut()),
            Err(error) if error.kind == ErrorKind::Unavailable => {
                if job.ctx.is_cancelled() {
                    Outcome::Cancelled
                } else {
                    Outcome::NoWorker { last: Some(error) }
                }
            }
            Err(error) => failed(id, error, job.ctx),
        }
    }

    /// One call to one prefill worker on a child of the request's context. Dropping the
    /// future (the caller went away) drops the call and cancels the worker's context.
    async fn attempt(
        &self,
        pick: Pick<PrefillRequest, PrefillResult>,
        job: &Job<'_>,
    ) -> Result<PrefillResult, ServeError> {
        let load = LoadGuard::charge(pick.load);
        load.dispatched();
        let child = job.ctx.child();
        let cancel = child.drop_guard();
        let request = PrefillRequest {
            request: job.request.clone(),
            handoff_id: job.handoff_id.to_owned(),
            decode_instance: job.decode_instance,
        };
        let mut stream = pick.client.call(request, child);
        let answer = {
            let cancelled = pin!(job.ctx.cancelled());
            match select(stream.next(), cancelled).await {
                Either::Left((answer, _)) => answer,
                Either::Right(((), _)) => return Err(ServeError::cancelled()),
            }
        };
        match answer {
            Some(Ok(result)) => {
                // Done: release the call without cancelling the worker's request.
                drop(stream);
                drop(cancel.disarm());
                Ok(result)
            }
            Some(Err(error)) => Err(error),
            None => Err(ServeError::internal(format!(
                "prefill worker {} ended its answer without a result",
                pick.id
            ))),
        }
    }
}

fn done(
    instance: InstanceId,
    result: PrefillResult,
    tracker: Option<&mut Box<dyn RequestTracker>>,
) -> Outcome {
    if let Some(t) = tracker {
        t.first_token();
    }
    Outcome::Done { instance, result }
}

fn failed(instance: InstanceId, error: ServeError, ctx: &RequestContext) -> Outcome {
    if error.kind == ErrorKind::Cancelled && ctx.is_cancelled() {
        Outcome::Cancelled
    } else {
        Outcome::Failed { instance, error }
    }
}
