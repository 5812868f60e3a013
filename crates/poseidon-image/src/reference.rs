//! Image references, normalised like Docker: `python:3.12` → `docker.io/library/python:3.12`.

use oci_client::Reference;

/// An image name that is not a valid reference.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {name:?}: {reason}")]
pub struct ReferenceError {
    pub name: String,
    pub reason: String,
}

/// Parses a reference the way `docker pull` reads it.
pub fn parse(name: &str) -> Result<Reference, ReferenceError> {
    name.parse::<Reference>()
        .map_err(|e| ReferenceError { name: name.to_owned(), reason: e.to_string() })
}

/// The full form of a reference: registry, repository and tag (`latest` when none) or digest.
pub fn normalize(name: &str) -> Result<String, ReferenceError> {
    Ok(parse(name)?.whole())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalised_like_docker() {
        assert_eq!(normalize("python:3.12").unwrap(), "docker.io/library/python:3.12");
        assert_eq!(normalize("python").unwrap(), "docker.io/library/python:latest");
        assert_eq!(
            normalize("openhpi/co_execenv_python:3.8").unwrap(),
            "docker.io/openhpi/co_execenv_python:3.8"
        );
        assert_eq!(normalize("127.0.0.1:5000/a/b:1").unwrap(), "127.0.0.1:5000/a/b:1");
        assert!(normalize("Python").is_err());
        assert!(normalize("a b").is_err());
        assert!(normalize("").is_err());
    }
}
