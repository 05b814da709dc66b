//! `gmem fuzz`: random scenarios, run on two implementations of the
//! contract, to find where they disagree.
//!
//! The software backend is the executable specification and the KVM backend
//! is the running kernel; both take the same scenario language. The fuzzer
//! puts them together:
//!
//! - [`generate`] makes a random, valid-looking scenario from a seed, biased
//!   toward edges (page boundaries, file ends, overlapping ranges, reuse
//!   after close, operations on released objects), within a memory budget
//!   and the KVM backend's rules ([`Profile`]).
//! - [`print`] turns a scenario back into `.gmem` text that the parser reads
//!   back to the same scenario.
//! - [`exec`] runs a scenario on each backend in a worker thread (a hang is
//!   bounded, a panic caught, fds and mappings counted from `/proc/self`)
//!   and compares the outcomes line by line.
//! - [`minimize`] shrinks a finding to the shortest scenario that still
//!   shows it and writes it as a corpus file whose expectations are the
//!   software backend's.
//! - [`model`] checks the software backend alone against a simple model of
//!   files, mappings and host memory, for `gmem fuzz --backend soft`.
//! - [`campaign`] runs programs from consecutive seeds and keeps the
//!   counts, the coverage and the first finding of each kind.
//! - [`coverage`] counts the operations and rule ids the runs reached.

pub mod campaign;
pub mod coverage;
pub mod exec;
pub mod generate;
pub mod minimize;
pub mod model;
pub mod print;

pub use campaign::{Campaign, Config, Mode};
pub use coverage::Coverage;
pub use exec::{Comparison, Executor, Finding, FindingKind, LineDiff, Verdict};
pub use generate::{generate, Limits, Profile};
pub use minimize::{minimize, Minimized};
pub use print::{print, print_line};
