#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

mod access;
mod config;
mod error;
mod router;
mod server;
mod session;
mod stats;
mod topic;
mod topic_tree;

pub use access::{Credentials, Gatekeeper, Grant, Open, Refusal};
pub use config::BrokerConfig;
pub use error::BrokerError;
pub use server::Broker;
pub use stats::BrokerStats;
