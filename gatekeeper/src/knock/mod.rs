//! Single-packet authorization, knock format v1.
//!
//! - [`keys`]: X25519 key pairs, key ids, and the per-client AEAD key.
//! - [`wire`]: the packet layout (see `docs/knock-v1.md`): sealing on the
//!   client, opening on the gateway.
//! - [`payload`]: the JSON a knock carries.
//! - [`verify`]: every check a knock must pass, and what it opens.

pub mod keys;
pub mod payload;
pub mod verify;
pub mod wire;
