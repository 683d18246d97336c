//! Events to append.

use chrono::Utc;
use event_log::NewEvent;
use event_schema::{Event, EventMetadata};

/// `event` ready to append: no metadata, occurred now.
pub fn new_event(event: impl Into<Event>) -> NewEvent {
    let event = event.into();
    NewEvent::from_event(&event, EventMetadata::default(), Utc::now()).unwrap_or_else(|e| panic!("encode: {e}"))
}
