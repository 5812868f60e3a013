//! Validated identifiers, so the rest of the core never handles raw strings or integers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An execution environment's id: a non-negative integer (Go's `int`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EnvironmentId(pub i64);

impl fmt::Display for EnvironmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A runner's id: `<environment id>-<uuid v1>`, safe to put into a URL path unescaped.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RunnerId(String);

impl RunnerId {
    /// A fresh id for a runner of `environment`.
    pub fn new(environment: EnvironmentId) -> Self {
        let node = uuid_node_id();
        Self(format!("{environment}-{}", uuid::Uuid::now_v1(&node)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The environment the id was created for (the part before the first `-`).
    pub fn environment(&self) -> Option<EnvironmentId> {
        let (prefix, _) = self.0.split_once('-')?;
        prefix.parse().ok().map(EnvironmentId)
    }
}

impl fmt::Display for RunnerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for RunnerId {
    type Err = std::convert::Infallible;

    /// Any string names a runner; unknown ones are simply not found.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A random node id per process, as UUID v1 allows when no MAC address is used.
fn uuid_node_id() -> [u8; 6] {
    static NODE: std::sync::OnceLock<[u8; 6]> = std::sync::OnceLock::new();
    *NODE.get_or_init(|| {
        let bytes = uuid::Uuid::new_v4().into_bytes();
        // The multicast bit marks the node id as random (RFC 9562, 6.10).
        [bytes[0] | 0x01, bytes[1], bytes[2], bytes[3], bytes[4], bytes[5]]
    })
}

/// A stored execution's id: a UUID v4, usable once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExecutionId(pub uuid::Uuid);

impl ExecutionId {
    pub fn new() -> Self {
        Self(uuid::Uuid::new_v4())
    }
}

impl Default for ExecutionId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for ExecutionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for ExecutionId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_ids_carry_their_environment() {
        let id = RunnerId::new(EnvironmentId(29));
        assert!(id.as_str().starts_with("29-"));
        assert_eq!(id.environment(), Some(EnvironmentId(29)));
        assert_ne!(id, RunnerId::new(EnvironmentId(29)));
        assert_eq!("abc".parse::<RunnerId>().unwrap().environment(), None);
    }
}
