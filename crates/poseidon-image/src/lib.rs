//! OCI images for Poseidon's local backend.
//!
//! A [`Store`] in the state directory keeps content-addressed blobs and one unpacked, read-only
//! root file system per image, shared by every runner of every environment on that image.
//! Images come from a registry ([`pull()`]) or from an archive ([`import()`]: `docker save` or an
//! OCI image layout). Unpacking never writes outside the image's root, however an archive is
//! crafted (see `unpack`).
#![forbid(unsafe_code)]

mod import;
mod pull;
mod reference;
mod store;
mod unpack;

pub use import::{ImportError, import, import_stream};
pub use pull::{Credentials, Progress, ProgressFn, PullError, RegistryConfig, pull};
pub use reference::{ReferenceError, normalize};
pub use store::{ImageRecord, RunConfig, Store, StoreConfig, StoreError};
pub use unpack::{MAPPED_IDS, UnpackError};
