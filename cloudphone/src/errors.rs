//! How `main` prints the error a verb ended with: one line, each cause once, and none of
//! PostgreSQL's internals (its source file, line and routine).
//!
//! Many errors already include their source in their own message (`sqlx`'s "error returned
//! from database: {0}", our `#[error("...: {0}")]` variants), so printing the chain with
//! anyhow's `{:#}` repeats the cause. Here a layer's message stands for its source when it
//! contains it; otherwise the source follows after ": ". A PostgreSQL error becomes its
//! message, SQLSTATE, detail and hint: its `Display` adds "at line N" of PostgreSQL's C code.

use std::error::Error;

use sqlx::postgres::PgDatabaseError;

/// The error as one line.
pub fn one_line(error: &anyhow::Error) -> String {
    let error: &(dyn Error + 'static) = error.as_ref();
    render(error).replace('\n', " ")
}

fn render(error: &(dyn Error + 'static)) -> String {
    if let Some(postgres) = error.downcast_ref::<PgDatabaseError>() {
        return render_postgres(postgres);
    }
    if let Some(sqlx::Error::Database(inner)) = error.downcast_ref::<sqlx::Error>()
        && let Some(postgres) = inner.try_downcast_ref::<PgDatabaseError>()
    {
        return render_postgres(postgres);
    }
    let own = error.to_string();
    let Some(source) = error.source() else {
        return own;
    };
    let source_shown = source.to_string();
    let cause = render(source);
    if !source_shown.is_empty() && own.contains(&source_shown) {
        own.replacen(&source_shown, &cause, 1)
    } else if own.is_empty() {
        cause
    } else {
        format!("{own}: {cause}")
    }
}

/// What an operator needs of a PostgreSQL error; never its `file`, `line` or `routine`.
fn render_postgres(error: &PgDatabaseError) -> String {
    let mut shown = format!("{} (SQLSTATE {})", error.message(), error.code());
    if let Some(detail) = error.detail() {
        shown.push_str(&format!("; detail: {detail}"));
    }
    if let Some(hint) = error.hint() {
        shown.push_str(&format!("; hint: {hint}"));
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug)]
    struct Refused;

    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection refused")
        }
    }

    impl std::error::Error for Refused {}

    /// Like `sqlx::Error::Io`: the message includes the source it also returns.
    #[derive(Debug)]
    struct Io(Refused);

    impl std::fmt::Display for Io {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "error communicating with database: {}", self.0)
        }
    }

    impl std::error::Error for Io {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn a_cause_already_in_its_layers_message_is_printed_once() {
        let error = anyhow::Error::new(Io(Refused)).context("cannot reach PostgreSQL at postgres://db/x");
        assert_eq!(
            one_line(&error),
            "cannot reach PostgreSQL at postgres://db/x: error communicating with database: connection refused"
        );
    }

    #[test]
    fn a_cause_not_in_the_message_follows_it() {
        let error = anyhow::Error::new(Refused).context("cannot reach PostgreSQL");
        assert_eq!(one_line(&error), "cannot reach PostgreSQL: connection refused");
    }
}
