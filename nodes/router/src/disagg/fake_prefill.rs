//! A fake prefill worker for the disaggregated router's tests: answers, fails, hangs or
//! waits for a gate, and keeps every request and context it was called with.

use std::sync::{Arc, Mutex};

use dynamo_protocol::{PrefillRequest, PrefillResult};
use dynamo_runtime::{
    ErrorKind, InstanceId, InstanceSet, RequestContext, ResponseStream, ServeError, Service,
};
use futures::channel::oneshot;
use futures::StreamExt;

#[derive(Clone, Copy)]
pub enum Prefill {
    /// Answers at once with `prompt_tokens` = the prompt's length.
    Answer,
    /// Fails at once with this kind.
    Fail(ErrorKind),
    /// Never answers.
    Hang,
    /// Answers once the gate returned by [`FakePrefill::gated`] is opened (or dropped).
    Gated,
}

pub struct FakePrefill {
    pub id: InstanceId,
    behaviour: Prefill,
    calls: Mutex<Vec<(PrefillRequest, RequestContext)>>,
    gate: Mutex<Option<oneshot::Receiver<()>>>,
}

impl FakePrefill {
    pub fn new(id: InstanceId, behaviour: Prefill) -> Arc<Self> {
        Arc::new(FakePrefill {
            id,
            behaviour,
            calls: Mutex::new(Vec::new()),
            gate: Mutex::new(None),
        })
    }

    /// A worker whose first call answers when the returned sender fires.
    pub fn gated(id: InstanceId) -> (Arc<Self>, oneshot::Sender<()>) {
        let (open, gate) = oneshot::channel();
        let fake = Self::new(id, Prefill::Gated);
        if let Ok(mut g) = fake.gate.lock() {
            *g = Some(gate);
        }
        (fake, open)
    }

    pub fn calls(&self) -> Vec<(PrefillRequest, RequestContext)> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Service<PrefillRequest, PrefillResult> for FakePrefill {
    fn call(&self, request: PrefillRequest, ctx: RequestContext) -> ResponseStream<PrefillResult> {
        let result = PrefillResult {
            prompt_tokens: request.request.token_ids.len() as u32,
            blocks: 1,
            ..PrefillResult::default()
        };
        if let Ok(mut c) = self.calls.lock() {
            c.push((request, ctx));
        }
        match self.behaviour {
            Prefill::Answer => Box::pin(futures::stream::iter([Ok(result)])),
            Prefill::Fail(kind) => Box::pin(futures::stream::iter([Err(ServeError::new(
                kind,
                "fake prefill failure",
            ))])),
            Prefill::Hang => Box::pin(futures::stream::pending()),
            Prefill::Gated => {
                let gate = self.gate.lock().ok().and_then(|mut g| g.take());
                Box::pin(
                    futures::stream::once(async move {
                        if let Some(gate) = gate {
                            let _ = gate.await;
                        }
                        Ok(result)
                    })
                    .boxed(),
                )
            }
        }
    }
}

pub fn prefill_set(fakes: &[&Arc<FakePrefill>]) -> Arc<InstanceSet<PrefillRequest, PrefillResult>> {
    let set = Arc::new(InstanceSet::new("prefill"));
    for f in fakes {
        set.add(f.id, (*f).clone());
    }
    set
}
