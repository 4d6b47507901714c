//! Open-loop sending: each row starts at its scheduled offset, whatever the earlier ones
//! are doing, up to a cap of requests in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::blocks::prompt_tokens;
use super::trace::Planned;
use crate::client::{measure, Outcome, PromptInput, Request, Target};

/// How prompts are made and how many requests may run at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sending {
    pub seed: u64,
    pub block_tokens: usize,
    pub concurrency_limit: usize,
    /// Stop starting rows after this long (a capped arrival may wait past its offset).
    pub deadline: Option<Duration>,
}

/// What happened to the rows.
#[derive(Debug, Default)]
pub(crate) struct Sent {
    pub outcomes: Vec<Outcome>,
    /// Rows started, always the first `sent` of the plan.
    pub sent: usize,
    /// How late each send was against its schedule (in the order the rows finished).
    pub start_lag: Vec<Duration>,
    /// TTFT and E2E of each answered row counted from its scheduled start (its start lag
    /// added), as a user arriving on the trace's schedule would have waited.
    pub ttft_from_schedule: Vec<Duration>,
    pub e2e_from_schedule: Vec<Duration>,
    pub elapsed: Duration,
}

/// Sends the rows of `plan` in order at their offsets; waits for every answer (each bounded
/// by the target's timeout).
pub(crate) async fn send_all(target: Arc<Target>, plan: &[Planned], s: Sending) -> Sent {
    let start = Instant::now();
    let deadline = s.deadline.and_then(|d| start.checked_add(d));
    let cap = Arc::new(Semaphore::new(s.concurrency_limit.max(1)));
    let mut in_flight = JoinSet::new();
    let mut out = Sent::default();
    // Bounded by the plan's length.
    for row in plan.iter() {
        let due = start.checked_add(row.offset).unwrap_or(start);
        tokio::time::sleep_until(due.into()).await;
        while let Some(joined) = in_flight.try_join_next() {
            out.collect(joined);
        }
        let wait = cap.clone().acquire_owned();
        let permit = match deadline {
            Some(d) => match tokio::time::timeout_at(d.into(), wait).await {
                Ok(p) => p,
                Err(_) => break,
            },
            None => wait.await,
        };
        let Ok(permit) = permit else { break };
        let (target, row) = (target.clone(), row.clone());
        in_flight.spawn(async move {
            let (lag, outcome) = send_row(&target, &row, s, due).await;
            drop(permit);
            (lag, outcome)
        });
        out.sent += 1;
    }
    while let Some(joined) = in_flight.join_next().await {
        out.collect(joined);
    }
    out.elapsed = start.elapsed();
    out
}

/// Builds the row's prompt and sends it; returns how late the send was against `due` (a
/// wait for a free slot, the task's start and the prompt's making included) and the
/// outcome, timed from the send.
async fn send_row(target: &Target, row: &Planned, s: Sending, due: Instant) -> (Duration, Outcome) {
    let tokens = prompt_tokens(s.seed, &row.hash_ids, row.prompt_tokens, s.block_tokens);
    let request = Request {
        prompt: PromptInput::TokenIds(&tokens),
        max_tokens: row.max_tokens,
        approx_input: tokens.len() as u64,
    };
    let lag = Instant::now().saturating_duration_since(due);
    (lag, measure(target, &request).await)
}

impl Sent {
    /// Keeps a finished row's outcome and, when it was answered, its times from the
    /// schedule.
    fn collect(&mut self, joined: Result<(Duration, Outcome), tokio::task::JoinError>) {
        match joined {
            Ok((lag, o)) => {
                self.start_lag.push(lag);
                if o.error.is_none() {
                    self.ttft_from_schedule.extend(o.ttft.map(|t| t + lag));
                    self.e2e_from_schedule.push(o.e2e + lag);
                }
                self.outcomes.push(o);
            }
            Err(e) => tracing::error!(error = %e, "replay request task ended abnormally"),
        }
    }
}
