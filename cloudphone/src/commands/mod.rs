//! One module per verb.

pub mod database;
pub mod export;
pub mod keys;
pub mod load;
pub mod load_export;
pub mod load_history;
pub mod load_hostile;
pub mod load_platform;
pub mod load_projections;
pub mod load_queries;
pub mod load_replay;
pub mod migrate;
pub mod partitions;
pub mod replay;
pub mod role_endpoints;
pub mod sampler;
pub mod serve;
pub mod token;
pub mod verify;
