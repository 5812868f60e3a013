//! The backend-agnostic core of Poseidon: execution environments, prewarmed pools, claimed
//! runners, stored and running executions, timers and persistence. It knows no HTTP and no
//! system calls; backends plug in through [`backend::Backend`].
#![forbid(unsafe_code)]

pub mod backend;
pub mod environment;
mod error;
mod execution;
pub mod ids;
mod manager;
mod pool;
mod store;
mod timers;

pub use error::{
    ClaimError, CoreError, EnvironmentError, FileOpError, RunnerError, StartError, StoreError,
};
pub use execution::{
    ERROR_GENERIC, ERROR_OOM, ERROR_STOPPED, ExecutionEvent, ExecutionRequest, RunningExecution,
};
pub use manager::{ClaimedRunner, Core, CoreConfig, EnvironmentStatistics, PutOutcome};
