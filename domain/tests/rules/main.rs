//! The domain's rules, pure and fast: the device rules one story each (`device_rules`), and
//! model-based property tests over random command sequences (`properties`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests panic on purpose

mod device_rules;
mod properties;
