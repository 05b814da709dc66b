//! Scenario files (`.gmem`): parser and runner.
//!
//! A scenario is a script of guest_memfd operations, each with the outcome
//! it must have (the language is `docs/scenarios.md`). [`parse()`] reads one,
//! [`run()`] performs it on any [`Hypervisor`](crate::Hypervisor), and
//! [`report`] runs files on one or two backends, applies the departures
//! recorded for the running kernel ([`departures`]) and renders the table
//! `gmem check` prints.

pub mod ast;
pub mod departures;
pub mod parse;
pub mod probe;
pub mod report;
pub mod run;

pub use ast::{Line, Op, Outcome, RequireKind, Requirement, Scenario};
pub use departures::{kernel_release, Departure, Departures};
pub use parse::{parse, parse_number, parse_outcome, ParseError, ParseErrors};
pub use probe::{match_release, Probe, ReleaseMatch};
pub use report::{
    collect_files, render, BackendSlot, CheckReport, Checker, ScenarioReport, Verdict,
};
pub use run::{run, unmet_requirement, LineResult, ScenarioRun};
