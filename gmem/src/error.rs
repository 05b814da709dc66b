//! Errors as a kernel would give them: the errno, the rule that refused the
//! request and the values involved.

use std::fmt;

pub use nix::errno::Errno;

/// A refused request: `guest_memfd_offset 0x1001 is not page aligned (SLOT-7, EINVAL)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({rule}, {})", errno_name(*.errno))]
pub struct Error {
    /// The errno the kernel returns for this request.
    pub errno: Errno,
    /// The spec rule id that refused it (`SLOT-7`), or `kernel` when the
    /// running kernel refused it and no rule of ours predicted the refusal.
    pub rule: &'static str,
    /// What was wrong, with the values involved.
    pub message: String,
}

/// Result of every contract operation.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Builds an error; prefer the [`refuse!`](crate::refuse) macro.
    pub fn new(errno: Errno, rule: &'static str, message: impl Into<String>) -> Self {
        Error {
            errno,
            rule,
            message: message.into(),
        }
    }

    /// An error returned by the running kernel for `what`.
    pub fn kernel(errno: Errno, what: impl fmt::Display) -> Self {
        Error::new(errno, "kernel", format!("{what} failed"))
    }

    /// The same error from the last `errno` of a failed system call.
    pub fn last_os_error(what: impl fmt::Display) -> Self {
        Error::kernel(Errno::last(), what)
    }
}

/// The symbolic name of an errno: `EINVAL`.
pub fn errno_name(errno: Errno) -> String {
    format!("{errno:?}")
}

/// Parses an errno name (`EINVAL`) into an [`Errno`].
pub fn errno_from_name(name: &str) -> Option<Errno> {
    // Errnos are small; walking them is cheaper than keeping a table in sync.
    (1..4096)
        .map(Errno::from_raw)
        .find(|e| *e != Errno::UnknownErrno && errno_name(*e) == name)
}

/// `return Err(Error)` with the errno, the rule id and a formatted message.
#[macro_export]
macro_rules! refuse {
    ($errno:ident, $rule:literal, $($fmt:tt)+) => {
        return Err($crate::error::Error::new(
            $crate::error::Errno::$errno,
            $rule,
            format!($($fmt)+),
        ))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_rule_and_errno() {
        let e = Error::new(
            Errno::EINVAL,
            "SLOT-7",
            "guest_memfd_offset 0x1001 is not page aligned",
        );
        assert_eq!(
            e.to_string(),
            "guest_memfd_offset 0x1001 is not page aligned (SLOT-7, EINVAL)"
        );
    }

    #[test]
    fn errno_names_round_trip() {
        for name in [
            "EINVAL",
            "EEXIST",
            "EBADF",
            "ENODEV",
            "EOPNOTSUPP",
            "ESPIPE",
            "ENOTTY",
        ] {
            let e = errno_from_name(name).unwrap();
            assert_eq!(errno_name(e), name);
        }
        assert_eq!(errno_from_name("ENOPE"), None);
    }
}
