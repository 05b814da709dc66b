//! Recorded departures of a running kernel from the spec
//! (`scenarios/departures.toml`).
//!
//! A departure says: on kernel release R, line L of scenario S has outcome O
//! instead of the one the scenario expects, because E. The expectation stays
//! as upstream has it; the report shows the line as "departs from upstream".
//!
//! ```toml
//! [["6.18.44-fc-v669"]]
//! scenario = "fault/fault-3-gmem-only-reads-file.gmem"
//! line = 12
//! observed = "0x00"
//! explanation = "this kernel serves guest_memfd-only slots from userspace_addr"
//! ```
//!
//! The same file records where a contract test (gmem/tests/contract) fails
//! on a kernel, so that every departure lives in one place:
//!
//! ```toml
//! [["6.18.44-fc-v669"]]
//! contract_test = "faults::access_after_the_file_is_released_is_a_memory_fault"
//! rule = "FAULT-6"
//! explanation = "an access after the file's release exits as MMIO"
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ast::Outcome;
use super::parse::parse_outcome;

/// One recorded departure.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Departure {
    /// Scenario path relative to the corpus folder, `/`-separated.
    pub scenario: String,
    /// Line number in that file.
    pub line: usize,
    /// The outcome this kernel gives, in scenario syntax (`EINVAL`, `0x00`,
    /// `exit mmio gpa=0x1000 read`).
    pub observed: String,
    /// Why, in a sentence: what the kernel does instead and where it comes from.
    pub explanation: String,
}

impl Departure {
    /// The recorded outcome, parsed.
    pub fn observed_outcome(&self) -> Option<Outcome> {
        parse_outcome(&self.observed).ok()
    }
}

/// A contract test that fails on a kernel because the kernel departs from
/// the rule it checks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TestDeparture {
    /// The test, `section::name` as gmem/tests/contract instantiates it.
    pub contract_test: String,
    /// The rule id the kernel departs from.
    pub rule: String,
    /// What the kernel does instead.
    pub explanation: String,
}

/// One entry of the file: a scenario line or a contract test.
#[derive(Deserialize)]
#[serde(untagged)]
enum Record {
    Scenario(Departure),
    Test(TestDeparture),
}

/// All recorded departures, by kernel release (`uname -r`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Departures {
    /// Release → scenario departures on it.
    pub by_release: BTreeMap<String, Vec<Departure>>,
    /// Release → contract tests that depart on it.
    pub tests_by_release: BTreeMap<String, Vec<TestDeparture>>,
}

impl Departures {
    /// Parses a departures file: a table of arrays keyed by kernel release.
    /// Every `observed` must parse as an outcome.
    pub fn parse(text: &str) -> Result<Self, String> {
        let records: BTreeMap<String, Vec<Record>> =
            toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_release = BTreeMap::<String, Vec<Departure>>::new();
        let mut tests_by_release = BTreeMap::<String, Vec<TestDeparture>>::new();
        for (rel, rs) in records {
            for r in rs {
                match r {
                    Record::Scenario(d) => by_release.entry(rel.clone()).or_default().push(d),
                    Record::Test(t) => tests_by_release.entry(rel.clone()).or_default().push(t),
                }
            }
        }
        for (rel, ds) in &by_release {
            for d in ds {
                if let Err(e) = parse_outcome(&d.observed) {
                    return Err(format!(
                        "departure for {rel}, {} line {}: observed `{}`: expected {}, found {} (hint: {})",
                        d.scenario, d.line, d.observed, e.expected, e.found, e.hint
                    ));
                }
            }
        }
        Ok(Departures {
            by_release,
            tests_by_release,
        })
    }

    /// Reads a departures file; a missing file means none are recorded.
    pub fn load(path: &Path) -> Result<Self, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// The contract-test departures recorded for `release`.
    pub fn contract_tests(&self, release: &str) -> &[TestDeparture] {
        self.tests_by_release
            .get(release)
            .map_or(&[], Vec::as_slice)
    }

    /// The departures recorded for `release` in `scenario`.
    pub fn for_scenario<'a>(&'a self, release: &str, scenario: &str) -> Vec<&'a Departure> {
        self.by_release
            .get(release)
            .map(|ds| ds.iter().filter(|d| d.scenario == scenario).collect())
            .unwrap_or_default()
    }
}

/// The running kernel's release, as `uname -r` prints it.
pub fn kernel_release() -> String {
    read_osrelease().unwrap_or_else(|| "unknown".to_string())
}

fn read_osrelease() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn departures_parse_by_release() {
        let d = Departures::parse(
            r#"
[["6.18.44-x"]]
scenario = "a/b.gmem"
line = 3
observed = "exit mmio gpa=0x1000 read"
explanation = "why"
"#,
        )
        .unwrap();
        let found = d.for_scenario("6.18.44-x", "a/b.gmem");
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].observed_outcome(),
            Some(Outcome::Mmio {
                gpa: 0x1000,
                write: Some(false)
            })
        );
        assert!(d.for_scenario("other", "a/b.gmem").is_empty());
    }

    #[test]
    fn contract_test_departures_are_kept_apart_by_release() {
        let d = Departures::parse(
            "[[\"r\"]]\ncontract_test = \"faults::x\"\nrule = \"FAULT-6\"\nexplanation = \"why\"\n",
        )
        .unwrap();
        assert_eq!(d.contract_tests("r")[0].contract_test, "faults::x");
        assert!(d.contract_tests("other").is_empty());
        assert!(d.for_scenario("r", "faults::x").is_empty());
    }

    #[test]
    fn departure_with_bad_outcome_is_refused() {
        let e = Departures::parse(
            "[[\"r\"]]\nscenario = \"a\"\nline = 1\nobserved = \"EWHAT\"\nexplanation = \"x\"\n",
        )
        .unwrap_err();
        assert!(e.contains("errno"), "{e}");
    }
}
