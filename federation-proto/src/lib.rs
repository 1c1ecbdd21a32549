//! Wire protocol of the telemedicine federation.
pub mod types;
pub use types::*;
