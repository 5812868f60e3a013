//! `POST /v1/jobs/parse`: job specifications to Nomad's JSON job.

use serde_json::Value;

/// Why a specification could not be parsed (Nomad: 400 `Failed to parse job: ...`).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("{0}")]
    Syntax(String),
}

/// A JSON job (`{"Job": {...}}` or the job itself).
pub(crate) fn parse_job(source: &str) -> Result<Value, ParseError> {
    let value: Value =
        serde_json::from_str(source).map_err(|e| ParseError::Syntax(e.to_string()))?;
    Ok(value.get("Job").cloned().unwrap_or(value))
}
