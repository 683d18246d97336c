//! Progress bars and flag groups the operator verbs share: what the `cloudphone` binary's
//! verbs and the load tools (`load-tools`, behind `cloudphone load`) both use, kept below
//! both so that neither depends on the other for it.
//!
//! - [`progress`]: progress of long operator work, a bar on a terminal and structured log
//!   lines otherwise; [`replay_bars`]: a replay's phases shown that way.
//! - [`flags`]: the clap flag groups several verbs flatten (the database, the master keys),
//!   each with its `CLOUDPHONE_*` environment fallback.
//!
//! This crate holds no verb and no SQL: it presents and parses, and the verbs do the work.

pub mod flags;
pub mod progress;
pub mod replay_bars;

pub use progress::Progress;
pub use replay_bars::BarObserver;
