//! The process's memory allocator: mimalloc, and the one setting the platform gives it.
//!
//! Every role allocates per request (bodies, JSON values, GraphQL documents and answers) from
//! many threads at once. Under load glibc's malloc took a fifth of the query API's CPU, and
//! mimalloc's thread-local heaps take a fraction of that (BENCHMARKS.md, "Allocation").
//!
//! This is the workspace's one crate with unsafe code: a single call into mimalloc's C
//! options, made once before the process does its work. It must never do anything else.

use std::ffi::{c_int, c_long};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`, `mi_option_e`; the same in its v2 and
/// v3): milliseconds before freed memory is given back to the operating system, -1 never.
const MI_OPTION_PURGE_DELAY: c_int = 15;

/// The environment variable through which mimalloc reads the same option at start.
pub const PURGE_DELAY_ENV: &str = "MIMALLOC_PURGE_DELAY";

// Declared here rather than through libmimalloc-sys's `extended` feature, which would pull in
// a crate for C types that `std::ffi` has. The symbol is in the library the allocator links.
#[allow(unsafe_code)]
unsafe extern "C" {
    fn mi_option_set(option: c_int, value: c_long);
    fn mi_option_get(option: c_int) -> c_long;
}

/// Keeps the memory the process frees for its own reuse, unless the operator set
/// `MIMALLOC_PURGE_DELAY`.
///
/// By default mimalloc hands freed memory back to the operating system after a delay, and
/// takes it again as fresh pages, which the kernel faults in and zeroes on first touch (2 MiB
/// at a time where transparent huge pages are on). Under `load platform`, with that off, the
/// command API's CPU per operation fell by an eighth and the mix completed 1.04x and 1.12x the
/// operations in two rounds; a ten-second delay gained nothing (BENCHMARKS.md, "Freed memory
/// kept"). The price: each process's resident size stays near its peak (about 20 MiB more
/// per role there).
pub fn keep_freed_memory() {
    if std::env::var_os(PURGE_DELAY_ENV).is_some() {
        return;
    }
    // SAFETY: mi_option_set stores one integer in mimalloc's option table; it is safe to call
    // at any time from any thread, and both arguments are plain values.
    #[allow(unsafe_code)]
    unsafe {
        mi_option_set(MI_OPTION_PURGE_DELAY, -1)
    };
}

/// mimalloc's purge delay as it stands: milliseconds, or -1 for never.
pub fn purge_delay() -> c_long {
    // SAFETY: mi_option_get reads one integer from mimalloc's option table.
    #[allow(unsafe_code)]
    unsafe {
        mi_option_get(MI_OPTION_PURGE_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's purge delay (its default there is 1000 ms in mimalloc
    /// v3; the options beside it default to 1 and 0), and this crate sets it to "never"
    /// unless the operator chose a value.
    #[test]
    fn freed_memory_is_kept_unless_the_operator_said_otherwise() {
        let before = purge_delay();
        keep_freed_memory();
        if std::env::var_os(PURGE_DELAY_ENV).is_some() {
            assert_eq!(purge_delay(), before, "the operator's value was overridden");
        } else {
            assert_eq!(
                before, 1000,
                "option {MI_OPTION_PURGE_DELAY} is not mimalloc's purge delay"
            );
            assert_eq!(purge_delay(), -1);
        }
    }
}
