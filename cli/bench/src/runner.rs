//! Starting requests: a closed loop (N workers, each sends its next request when the last
//! one ends) or an open loop (Poisson arrivals, optionally capped). Both stop on the
//! request count or the deadline, whichever comes first; requests in flight then finish,
//! each bounded by its timeout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::args::{Bound, Load};
use crate::client::{measure, Outcome, PromptInput, Request, Target};
use crate::prompt::PromptGenerator;
use crate::rng::SplitMix64;

/// Requests of one phase (warmup or measured) and how long the phase took.
#[derive(Debug, Default)]
pub(crate) struct Phase {
    pub outcomes: Vec<Outcome>,
    pub elapsed: Duration,
}

/// Everything a phase needs besides its bounds.
#[derive(Clone)]
pub(crate) struct Plan {
    pub target: Arc<Target>,
    pub prompts: Arc<PromptGenerator>,
    pub load: Load,
    pub seed: u64,
    /// `max_tokens` of every request.
    pub output_tokens: u32,
}

/// Runs one phase; prompt indices start at `first_index` so phases never repeat prompts.
pub(crate) async fn run_phase(plan: &Plan, bound: Bound, first_index: u64) -> Phase {
    let start = Instant::now();
    let deadline = bound.duration.map(|d| start + d);
    let outcomes = match plan.load {
        Load::Closed { concurrency } => {
            closed(plan, bound.requests, deadline, first_index, concurrency).await
        }
        Load::Open {
            rate,
            max_concurrency,
        } => {
            open(
                plan,
                bound.requests,
                deadline,
                first_index,
                rate,
                max_concurrency,
            )
            .await
        }
    };
    Phase {
        outcomes,
        elapsed: start.elapsed(),
    }
}

async fn one(plan: &Plan, index: u64) -> Outcome {
    let prompt = plan.prompts.prompt(index);
    let request = Request {
        prompt: PromptInput::Text(&prompt.text),
        max_tokens: plan.output_tokens,
        approx_input: prompt.approx_tokens as u64,
    };
    measure(&plan.target, &request).await
}

fn past(deadline: Option<Instant>) -> bool {
    deadline.is_some_and(|d| Instant::now() >= d)
}

async fn closed(
    plan: &Plan,
    requests: Option<u64>,
    deadline: Option<Instant>,
    first_index: u64,
    concurrency: usize,
) -> Vec<Outcome> {
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        let plan = plan.clone();
        let next = next.clone();
        workers.spawn(async move {
            let mut done = Vec::new();
            // Bounded: `Bound` always sets a request count or a deadline.
            loop {
                if past(deadline) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if requests.is_some_and(|n| i >= n) {
                    break;
                }
                done.push(one(&plan, first_index + i).await);
            }
            done
        });
    }
    let mut outcomes = Vec::new();
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(done) => outcomes.extend(done),
            Err(e) => tracing::error!(error = %e, "bench worker ended abnormally"),
        }
    }
    outcomes
}

async fn open(
    plan: &Plan,
    requests: Option<u64>,
    deadline: Option<Instant>,
    first_index: u64,
    rate: f64,
    max_concurrency: Option<usize>,
) -> Vec<Outcome> {
    let cap = max_concurrency.map(|n| Arc::new(Semaphore::new(n)));
    let mut gaps = SplitMix64::derived(plan.seed, 3, first_index);
    let mut in_flight = JoinSet::new();
    let mut outcomes = Vec::new();
    let mut arrival = Instant::now();
    let mut sent = 0u64;
    // Bounded: `Bound` always sets a request count or a deadline.
    while requests.is_none_or(|n| sent < n) {
        if deadline.is_some_and(|d| arrival >= d) {
            break;
        }
        tokio::time::sleep_until(arrival.into()).await;
        while let Some(joined) = in_flight.try_join_next() {
            collect(joined, &mut outcomes);
        }
        let permit = match &cap {
            None => None,
            Some(sem) => {
                let wait = sem.clone().acquire_owned();
                let permit = match deadline {
                    Some(d) => tokio::time::timeout_at(d.into(), wait).await.ok(),
                    None => Some(wait.await),
                };
                match permit {
                    Some(Ok(p)) => Some(p),
                    // Deadline reached while capped, or the semaphore closed: stop sending.
                    _ => break,
                }
            }
        };
        let plan = plan.clone();
        let index = first_index + sent;
        in_flight.spawn(async move {
            let outcome = one(&plan, index).await;
            drop(permit);
            outcome
        });
        sent += 1;
        let gap = Duration::try_from_secs_f64(gaps.exponential(rate))
            .unwrap_or(Duration::from_secs(3600));
        // Arrival times follow the Poisson schedule; a capped arrival that waited does
        // not push the later ones back.
        arrival += gap;
    }
    while let Some(joined) = in_flight.join_next().await {
        collect(joined, &mut outcomes);
    }
    outcomes
}

fn collect(joined: Result<Outcome, tokio::task::JoinError>, outcomes: &mut Vec<Outcome>) {
    match joined {
        Ok(o) => outcomes.push(o),
        Err(e) => tracing::error!(error = %e, "bench request task ended abnormally"),
    }
}
