//! Scenario files (`.gmem`): parser, runner, departures and reports.
//!
//! A scenario is a script of guest_memfd operations, each with the outcome
//! it must have (the language is `docs/scenarios.md`). [`parse()`] reads one,
//! [`run()`] performs it on any [`Hypervisor`](crate::Hypervisor) under a
//! memory budget ([`budget`]), and [`report`] runs files on one or two
//! backends, recognises the departures of the running kernel by behaviour
//! ([`departures`], modelled in [`behaviour`]) and renders the table
//! `gmem check` prints.

pub mod ast;
pub mod behaviour;
pub mod budget;
pub mod departures;
pub mod parse;
pub mod probe;
pub mod report;
pub mod run;

pub use ast::{Line, Op, Outcome, RequireKind, Requirement, Scenario};
pub use budget::Limits;
pub use departures::{kernel_release, Behaviour, Departures, Explainer, KernelId, Probes};
pub use parse::{parse, parse_number, parse_outcome, ParseError, ParseErrors};
pub use probe::{match_release, match_release_in, Probe, ReleaseMatch};
pub use report::{
    collect_files, collect_paths, render, BackendSlot, CheckReport, Checker, ScenarioReport,
    Source, Verdict,
};
pub use run::{run, run_limited, unmet_requirement, LineResult, ScenarioRun};
