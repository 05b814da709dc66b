//! Scenario files (`.gmem`): parser and runner.
