//! Behaviour of the core against a scripted backend, on tokio's paused clock.

mod environments;
mod executions;
mod pools;
mod recovery;
mod runners;
mod support;
