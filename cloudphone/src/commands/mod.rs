//! One module per verb.

pub mod database;
pub mod dead_letters;
pub mod erasures;
pub mod export;
pub mod keys;
pub mod migrate;
pub mod partitions;
pub mod replay;
pub mod role_endpoints;
pub mod sampler;
pub mod serve;
pub mod token;
pub mod verify;
