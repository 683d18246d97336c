//! What the simulated users do: portals sending device commands ([`portal`]), dashboards
//! polling their queries ([`dashboards`]) and what their answers must say ([`answers`]).

pub mod answers;
pub mod dashboards;
pub mod portal;
