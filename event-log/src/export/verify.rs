//! The verifier: streams an export file through the reader and checks its hash chain, its
//! positions and its trailer, reporting the first problem ([`super`] says what a file that
//! verifies proves).

use std::fmt;
use std::io::BufRead;

use event_schema::canonical::envelope_bytes;
use event_schema::{ChainHash, EventEnvelope};

use super::{EXPORT_FORMAT_V1, ExportFileError, ExportFormat, ExportLine, ExportReader, ExportRecord, ExportTrailer};
use crate::chain::chain_hash;

/// What a verified export file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportVerification {
    pub count: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    /// Hash of the last event: compare it with the log's hash at `last_position`.
    pub last_hash: Option<ChainHash>,
    /// `prev_hash` of the first event: the hash of the position before the file, which the
    /// file cannot check (the genesis hash when the file starts at position 1).
    pub anchor: Option<ChainHash>,
    /// What the trailer claims, verified when true.
    pub contiguous: bool,
    /// How many times a position was not the previous one + 1 (0 when contiguous).
    pub gaps: u64,
}

/// Verifies an export file, streaming it in constant memory, and reports the first problem
/// (see the module documentation for what is checked and what that proves).
pub fn verify_export(reader: impl BufRead, format: ExportFormat) -> Result<ExportVerification, ExportFileError> {
    let mut records = ExportReader::new(reader, format);
    let mut chain = FileChain::default();
    loop {
        let problem = match records.next() {
            None => {
                return Err(ExportFileError::MissingTrailer {
                    last_position: chain.last.map(|last| last.position),
                    lines: records.lines_read(),
                });
            }
            Some(Err(problem)) => problem,
            Some(Ok(ExportLine {
                line,
                record: ExportRecord::Event(event),
            })) => match chain.check(line, &event) {
                Ok(()) => continue,
                Err(problem) => problem,
            },
            Some(Ok(ExportLine {
                line,
                record: ExportRecord::Trailer(trailer),
            })) => {
                let verification = chain.finish(line, &trailer)?;
                return match records.next() {
                    None => Ok(verification),
                    Some(Err(ExportFileError::Io(error))) => Err(ExportFileError::Io(error)),
                    Some(Ok(ExportLine { line, .. }) | Err(ExportFileError::Unparsable { line, .. })) => {
                        Err(ExportFileError::TrailingData { line })
                    }
                    Some(Err(_)) => Err(ExportFileError::TrailingData {
                        line: records.lines_read(),
                    }),
                };
            }
        };
        return Err(chain.first_problem(problem, &mut records));
    }
}

#[derive(Debug, Clone, Copy)]
struct Last {
    position: i64,
    hash: ChainHash,
}

/// The verifier's state: what it must remember of the events seen (constant size).
#[derive(Debug, Default)]
struct FileChain {
    count: u64,
    first: Option<(i64, ChainHash)>,
    last: Option<Last>,
    gaps: u64,
    /// The first gap, an error only if the trailer claims the file is contiguous.
    first_gap: Option<(u64, i64, i64)>,
}

impl FileChain {
    fn check(&mut self, line: u64, event: &EventEnvelope) -> Result<(), ExportFileError> {
        let position = event.position;
        let expected_prev = match self.last {
            Some(last) if position <= last.position => {
                return Err(ExportFileError::OutOfOrder {
                    line,
                    position,
                    previous: last.position,
                });
            }
            Some(last) if position == last.position + 1 => Some(last.hash),
            Some(last) => {
                self.gaps += 1;
                self.first_gap.get_or_insert((line, last.position, position));
                None
            }
            None if position < 1 => {
                return Err(ExportFileError::OutOfOrder {
                    line,
                    position,
                    previous: 0,
                });
            }
            None if position == 1 => Some(ChainHash::GENESIS),
            None => None,
        };
        if let Some(expected) = expected_prev
            && event.prev_hash != expected
        {
            return Err(ExportFileError::PrevHashMismatch {
                line,
                position,
                expected,
                found: event.prev_hash,
            });
        }
        let computed = chain_hash(&event.prev_hash, &envelope_bytes(event));
        if computed != event.hash {
            return Err(ExportFileError::HashMismatch {
                line,
                position,
                stored: event.hash,
                computed,
            });
        }
        self.count += 1;
        self.first.get_or_insert((position, event.prev_hash));
        self.last = Some(Last {
            position,
            hash: event.hash,
        });
        Ok(())
    }

    fn gap_error(&self) -> Option<ExportFileError> {
        self.first_gap
            .map(|(line, after, next)| ExportFileError::Gap { line, after, next })
    }

    fn finish(&self, line: u64, trailer: &ExportTrailer) -> Result<ExportVerification, ExportFileError> {
        fn shown<T: fmt::Display>(value: Option<T>) -> String {
            value.map_or_else(|| "null".to_owned(), |v| v.to_string())
        }
        let mismatch = |field: &'static str, claimed: String, found: String| ExportFileError::TrailerMismatch {
            line,
            field,
            claimed,
            found,
        };
        if trailer.format != EXPORT_FORMAT_V1 {
            return Err(mismatch("format", trailer.format.clone(), EXPORT_FORMAT_V1.to_owned()));
        }
        if trailer.contiguous
            && let Some(gap) = self.gap_error()
        {
            return Err(gap);
        }
        let first_position = self.first.map(|(position, _)| position);
        let last_position = self.last.map(|last| last.position);
        let last_hash = self.last.map(|last| last.hash);
        if trailer.count != self.count {
            return Err(mismatch("count", trailer.count.to_string(), self.count.to_string()));
        }
        if trailer.first_position != first_position {
            return Err(mismatch(
                "first_position",
                shown(trailer.first_position),
                shown(first_position),
            ));
        }
        if trailer.last_position != last_position {
            return Err(mismatch(
                "last_position",
                shown(trailer.last_position),
                shown(last_position),
            ));
        }
        if trailer.last_hash != last_hash {
            return Err(mismatch("last_hash", shown(trailer.last_hash), shown(last_hash)));
        }
        Ok(ExportVerification {
            count: self.count,
            first_position,
            last_position,
            last_hash,
            anchor: self.first.map(|(_, anchor)| anchor),
            contiguous: trailer.contiguous,
            gaps: self.gaps,
        })
    }

    /// `problem` was found after the file's first gap; the gap came first, and is the first
    /// problem if the trailer claims the file contiguous. Reads on to the trailer to know.
    fn first_problem<R: BufRead>(&self, problem: ExportFileError, records: &mut ExportReader<R>) -> ExportFileError {
        let Some(gap) = self.gap_error() else {
            return problem;
        };
        if matches!(problem, ExportFileError::Io(_)) {
            return problem;
        }
        for record in records {
            match record {
                Ok(ExportLine {
                    record: ExportRecord::Trailer(trailer),
                    ..
                }) => return if trailer.contiguous { gap } else { problem },
                Err(ExportFileError::Io(_)) => return problem,
                _ => {}
            }
        }
        problem
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests;
