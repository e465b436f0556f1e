//! `ambient-coordinator`: the gateway service behind the `ambient` CLI.
#![deny(missing_docs)]

mod registry;
mod scheduler;
pub mod store;

pub use registry::*;
pub use scheduler::*;
