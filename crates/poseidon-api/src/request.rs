//! Bounded, Go-compatible reading of request bodies and query strings.
//!
//! Go Poseidon decodes JSON leniently (unknown fields ignored, missing fields zero, only the
//! first JSON value read, an empty body is the error `EOF`) and never looks at the request's
//! `Content-Type`; CodeOcean relies on that leniency. Every read here is bounded in size and
//! time.

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use futures::StreamExt;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Like Go's `ReadTimeout`: a body that takes longer than this to arrive is refused.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Reads the whole body, refusing more than `limit` bytes.
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let read = async {
        let mut stream = body.into_data_stream();
        let mut collected = Vec::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|error| ApiError::BadRequest(error.to_string()))?;
            if collected.len() + chunk.len() > limit {
                return Err(ApiError::BodyTooLarge { limit });
            }
            collected.extend_from_slice(&chunk);
        }
        Ok(Bytes::from(collected))
    };
    tokio::time::timeout(BODY_READ_TIMEOUT, read).await.unwrap_or(Err(ApiError::BodyTimeout))
}

/// Reads and discards up to `limit` bytes of the body, so that a keep-alive client that is
/// still uploading does not see its connection reset by an early answer (poseidon issue #54).
pub(crate) async fn drain_body(body: Body, limit: usize) {
    let drain = async {
        let mut stream = body.into_data_stream();
        let mut drained = 0;
        while let Some(Ok(chunk)) = stream.next().await {
            drained += chunk.len();
            if drained > limit {
                break;
            }
        }
    };
    // A stalled upload only costs us the timeout; the answer goes out regardless.
    let _ = tokio::time::timeout(BODY_READ_TIMEOUT, drain).await;
}

/// Decodes the first JSON value of `bytes` into the struct `T` as Go's `json.Decoder` does:
/// the value must be an object (or `null`, which leaves every field at its zero value).
pub(crate) fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bad_request = |error: serde_json::Error| ApiError::BadRequest(error.to_string());
    let object = match serde_json::Deserializer::from_slice(bytes).into_iter::<Value>().next() {
        None => return Err(ApiError::BadRequest("EOF".to_owned())),
        Some(value) => match value.map_err(bad_request)? {
            Value::Object(object) => object,
            Value::Null => Map::new(),
            other => {
                let kind = match other {
                    Value::Bool(_) => "bool",
                    Value::Number(_) => "number",
                    Value::String(_) => "string",
                    _ => "array",
                };
                return Err(ApiError::BadRequest(format!(
                    "json: cannot unmarshal {kind} into an object"
                )));
            }
        },
    };
    serde_json::from_value(Value::Object(object)).map_err(bad_request)
}

/// Reads a bounded body and decodes it as JSON.
pub(crate) async fn read_json<T: DeserializeOwned>(
    body: Body,
    limit: usize,
) -> Result<T, ApiError> {
    decode_json(&read_body(body, limit).await?)
}

/// The query string as key/value pairs; like Go's `Query().Get`, a key's first value counts.
#[derive(Debug, Default)]
pub(crate) struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    /// The value parsed with Go's `strconv.ParseBool`; missing or invalid → `default`.
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(parse_go_bool).unwrap_or(default)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for QueryParams {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let Query(pairs) = Query::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
        Ok(Self(pairs))
    }
}

/// Go's `strconv.ParseBool`.
pub(crate) fn parse_go_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Sample {
        count: Option<u32>,
    }

    #[test]
    fn json_is_decoded_like_go() {
        let bad = |bytes: &[u8]| match decode_json::<Sample>(bytes) {
            Err(ApiError::BadRequest(message)) => message,
            other => panic!("expected a 400, got {other:?}"),
        };
        assert_eq!(bad(b""), "EOF");
        assert_eq!(bad(b"  \n"), "EOF");
        assert!(bad(b"{\"count\": -1}").contains("invalid value"));
        assert!(bad(b"{").contains("EOF"));
        assert_eq!(decode_json::<Sample>(b"{\"other\":1}").unwrap(), Sample::default());
        assert_eq!(decode_json::<Sample>(b"{\"count\":null}").unwrap(), Sample::default());
        assert_eq!(decode_json::<Sample>(b"{\"count\":3} trailing").unwrap().count, Some(3));
        assert_eq!(decode_json::<Sample>(b"null").unwrap(), Sample::default());
        assert_eq!(bad(b"[1, 2]"), "json: cannot unmarshal array into an object");
        assert_eq!(bad(b"7"), "json: cannot unmarshal number into an object");
    }

    #[test]
    fn booleans_follow_go_parse_bool() {
        assert_eq!(parse_go_bool("T"), Some(true));
        assert_eq!(parse_go_bool("False"), Some(false));
        assert_eq!(parse_go_bool("yes"), None);
        assert_eq!(parse_go_bool(""), None);
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let body = Body::from(vec![b'x'; 11]);
        assert!(matches!(read_body(body, 10).await, Err(ApiError::BodyTooLarge { limit: 10 })));
        assert_eq!(read_body(Body::from("0123456789"), 10).await.unwrap().len(), 10);
    }
}
