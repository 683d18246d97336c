//! The worlds load runs act in, written before anything is measured: a history of device
//! lifecycles over months ([`history`]), the owners of those devices registered with quotas and
//! encrypted personal data ([`owners`]), or read models with no history behind them
//! ([`read_models`]).

pub mod history;
pub mod owners;
pub mod read_models;
