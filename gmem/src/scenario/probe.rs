//! Which release a backend follows, measured: the scenario lines whose
//! outcome differs between releases (`=> EINVAL | 7.2: EEXIST`) are run, and
//! the releases every observed outcome allows are kept ([`match_release`],
//! for `gmem caps`). [`consensus`] does the same for the lines of one
//! `gmem check`, and names the lines no release of the others allows.

use std::path::Path;

use serde::Serialize;

use super::parse::parse;
use super::report::collect_files;
use super::run::run;
use crate::hypervisor::Hypervisor;
use crate::Release;

/// One probe: a line whose outcome tells releases apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// `file:line`, the file relative to the corpus.
    pub at: String,
    /// The outcome observed, in scenario syntax.
    pub observed: String,
    /// The releases whose outcome it is.
    pub releases: Vec<Release>,
}

/// What the probes say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReleaseMatch {
    /// The releases every probe allows, oldest first (empty: none fits).
    pub candidates: Vec<Release>,
    /// The probes that ran, each with what it allowed.
    pub probes: Vec<Probe>,
    /// Probe files that did not run on this backend, with the reason.
    pub skipped: Vec<(String, String)>,
}

/// Runs every probe line of the corpus at `corpus` on `hv`.
pub fn match_release(hv: &dyn Hypervisor, corpus: &Path) -> std::io::Result<ReleaseMatch> {
    let mut files = Vec::new();
    for file in collect_files(corpus)? {
        let key = file
            .strip_prefix(corpus)
            .unwrap_or(&file)
            .display()
            .to_string();
        files.push((key, std::fs::read_to_string(&file)?));
    }
    Ok(match_release_in(hv, &files))
}

/// Runs every probe line of `files` (name relative to the corpus, text) on
/// `hv`: the corpus need not be on disk (an installed `gmem` has it built in).
pub fn match_release_in(hv: &dyn Hypervisor, files: &[(String, String)]) -> ReleaseMatch {
    let mut m = ReleaseMatch {
        candidates: Release::ALL.to_vec(),
        probes: Vec::new(),
        skipped: Vec::new(),
    };
    for (key, text) in files {
        let Ok(sc) = parse(key, text) else {
            continue;
        };
        if sc.lines.iter().all(|l| l.since.is_empty()) {
            continue;
        }
        let r = run(hv, &sc);
        if let Some(why) = r.skipped {
            m.skipped.push((key.clone(), why));
            continue;
        }
        for (line, result) in sc.lines.iter().zip(&r.lines) {
            let Some(actual) = result.actual.as_ref().filter(|_| !line.since.is_empty()) else {
                continue;
            };
            let releases = line.releases_matching(actual);
            m.candidates.retain(|c| releases.contains(c));
            m.probes.push(Probe {
                at: format!("{key}:{}", line.line),
                observed: actual.to_string(),
                releases,
            });
        }
    }
    m
}

impl ReleaseMatch {
    /// `6.18 to 7.1`, `7.2`, or `no release` when the probes disagree.
    pub fn summary(&self) -> String {
        match self.candidates.as_slice() {
            [] => "no release: the probes disagree (a kernel with backports?)".to_string(),
            some => describe(some),
        }
    }
}

/// `7.2`, `6.18 to 7.1` for consecutive releases, else `6.18, 7.2`.
pub fn describe(releases: &[Release]) -> String {
    let at = |r: &Release| Release::ALL.iter().position(|a| a == r);
    let consecutive = releases
        .windows(2)
        .all(|w| at(&w[1]) == at(&w[0]).map(|i| i + 1));
    match releases {
        [] => "no release".to_string(),
        [one] => one.to_string(),
        [first, .., last] if consecutive => format!("{first} to {last}"),
        all => all
            .iter()
            .map(Release::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// What the release-dependent lines of one run on a running kernel say
/// about the one release it follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consensus {
    /// The releases every line allows (the intersection, as
    /// [`match_release_in`] keeps it); where no release fits every line,
    /// those the most lines allow.
    pub releases: Vec<Release>,
    /// Per line: does it allow every one of [`Consensus::releases`]? A line
    /// that does not is inconsistent with the others.
    pub agrees: Vec<bool>,
}

/// The consensus of `lines`, each the releases whose outcome a line had.
pub fn consensus(lines: &[Vec<Release>]) -> Consensus {
    let count = |r: &Release| lines.iter().filter(|l| l.contains(r)).count();
    let most = Release::ALL.iter().map(count).max().unwrap_or(0);
    let releases: Vec<Release> = Release::ALL
        .into_iter()
        .filter(|r| count(r) == most)
        .collect();
    let agrees = lines
        .iter()
        .map(|l| releases.iter().all(|r| l.contains(r)))
        .collect();
    Consensus { releases, agrees }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::soft::SoftHypervisor;
    use Release::*;

    #[test]
    fn lines_that_share_a_release_all_agree_on_the_intersection() {
        let lines = [vec![V6_18, V6_19, V7_0, V7_1], vec![V6_18]];

        let c = consensus(&lines);

        assert_eq!(c.releases, [V6_18]);
        assert_eq!(c.agrees, [true, true]);
    }

    #[test]
    fn a_line_no_release_of_the_others_allows_disagrees() {
        let before_7_2 = vec![V6_18, V6_19, V7_0, V7_1];
        let lines = [before_7_2.clone(), vec![V7_2, Next], before_7_2];

        let c = consensus(&lines);

        assert_eq!(c.releases, [V6_18, V6_19, V7_0, V7_1]);
        assert_eq!(c.agrees, [true, false, true]);
        assert_eq!(describe(&c.releases), "6.18 to 7.1");
    }

    #[test]
    fn two_lines_that_contradict_each_other_both_disagree() {
        let lines = [vec![V6_18], vec![V7_2]];

        let c = consensus(&lines);

        assert_eq!(c.releases, [V6_18, V7_2]);
        assert_eq!(c.agrees, [false, false]);
        assert_eq!(describe(&c.releases), "6.18, 7.2");
    }

    fn corpus() -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios")
    }

    #[test]
    fn every_profile_is_told_apart_from_the_releases_that_differ() {
        let old = match_release(
            &SoftHypervisor::with_profile(Release::V6_18).unwrap(),
            &corpus(),
        )
        .unwrap();
        assert_eq!(old.candidates, [Release::V6_18]);
        assert_eq!(old.summary(), "6.18");
        for probe in ["bind-bound-range-errno", "numa-policy-per-file"] {
            assert!(old.probes.iter().any(|p| p.at.contains(probe)), "{probe}");
        }
        let numa = match_release(
            &SoftHypervisor::with_profile(Release::V6_19).unwrap(),
            &corpus(),
        )
        .unwrap();
        assert_eq!(numa.summary(), "6.19 to 7.1");
        let new = match_release(
            &SoftHypervisor::with_profile(Release::V7_2).unwrap(),
            &corpus(),
        )
        .unwrap();
        assert_eq!(new.candidates, [Release::V7_2]);
        let next = match_release(
            &SoftHypervisor::with_profile(Release::Next).unwrap(),
            &corpus(),
        )
        .unwrap();
        assert_eq!(next.candidates, [Release::Next]);
    }
}
