//! The repository documents itself: no tracked text file points to a
//! document outside it, docs/spec.md defines every rule id the code and the
//! tests use, each rule whose outcome differs by release says so in its
//! row, docs/scenarios.md describes every operation the scenario parser
//! accepts, and every public item of the memory manager has a runnable
//! doc example.
//!
//! Each check is a function of text, so that the tests at the end can show
//! that each one fails on text that breaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// What must not appear in the repository: references to documents that
/// live elsewhere. Built from pieces so that this file passes its own test.
fn outside_patterns() -> Vec<String> {
    vec![
        ["spec", "/guest_memfd.md"].concat(),
        ["spec", "/scenarios.md"].concat(),
        ["steer", "ing"].concat(),
        ["spec", " section"].concat(),
        ["..", "/shared"].concat(),
    ]
}

/// (line number, pattern) of every reference outside the repository in
/// `text`, case-insensitively.
fn outside_references(text: &str) -> Vec<(usize, String)> {
    let patterns = outside_patterns();
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let lower = line.to_lowercase();
        for p in &patterns {
            if lower.contains(p.as_str()) {
                found.push((i + 1, p.clone()));
            }
        }
    }
    found
}

/// The repository's tracked files (`git ls-files`); where git cannot say,
/// every file outside `target/` and `.git/`.
fn tracked_files() -> Vec<PathBuf> {
    let root = repo();
    let git = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(&root)
        .output();
    if let Ok(out) = git {
        if out.status.success() && !out.stdout.is_empty() {
            return out
                .stdout
                .split(|b| *b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| root.join(String::from_utf8_lossy(p).as_ref()))
                .collect();
        }
    }
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name();
            if name == "target" || name == ".git" {
                continue;
            }
            if p.is_dir() {
                walk(&p, out);
            } else {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root, &mut out);
    out
}

/// A rule id: `SLOT-7`, `KVM-SETUP`, `gmem-safety`.
fn is_rule_id(s: &str) -> bool {
    let mut parts = s.split('-');
    let first = parts.next().unwrap_or("");
    let rest: Vec<&str> = parts.collect();
    !first.is_empty()
        && first.chars().all(|c| c.is_ascii_alphabetic())
        && !rest.is_empty()
        && rest
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// How often each id is defined in a specification text: the first cell of
/// a table row, `| ID | ...`.
fn definitions(spec: &str) -> BTreeMap<String, usize> {
    let mut defs = BTreeMap::new();
    for line in spec.lines() {
        let Some(row) = line.strip_prefix('|') else {
            continue;
        };
        let cell = row.split('|').next().unwrap_or("").trim();
        if is_rule_id(cell) {
            *defs.entry(cell.to_string()).or_insert(0) += 1;
        }
    }
    defs
}

/// The ids of `ids` that `spec` does not define exactly once, with how
/// often it defines them.
fn not_defined_once(ids: &BTreeSet<String>, spec: &str) -> Vec<(String, usize)> {
    let defs = definitions(spec);
    ids.iter()
        .map(|id| (id.clone(), defs.get(id).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 1)
        .collect()
}

/// The `(id, release)` pairs whose row in `spec` does not say how the
/// outcome differs by release (`**By release:**`) naming that release.
fn release_not_in_row(spec: &str, changes: &[(String, &str)]) -> Vec<(String, String)> {
    changes
        .iter()
        .filter(|(id, release)| {
            let start = format!("| {id} |");
            !spec.lines().any(|l| {
                l.starts_with(&start) && l.contains("**By release:**") && l.contains(release)
            })
        })
        .map(|(id, release)| (id.clone(), release.to_string()))
        .collect()
}

/// The public items of Rust source `src` (`pub fn`, `struct`, `enum`,
/// `type`, `const`, `trait`, `static`) whose doc comment has no runnable
/// example (a code fence that is not `ignore`, `no_run` or
/// `compile_fail`), by line number and line. `pub mod name;` is judged by
/// `module_docs(name)`, the module's own `//!` text.
fn items_without_examples<'a>(
    src: &'a str,
    module_docs: &dyn Fn(&str) -> String,
) -> Vec<(usize, &'a str)> {
    // Fences alternate: an opening one says how the block is run.
    let runnable = |doc: &str| {
        doc.lines()
            .map(|l| l.trim_start_matches(['/', '!', ' ']))
            .filter(|l| l.starts_with("```"))
            .step_by(2)
            .any(|open| open == "```" || open == "```rust")
    };
    let lines: Vec<&str> = src.lines().collect();
    let mut missing = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(rest) = t.strip_prefix("pub ") else {
            continue;
        };
        let kind = rest.split_whitespace().next().unwrap_or("");
        let doc = if kind == "mod" {
            let name = rest[4..].trim_end_matches(';').trim();
            module_docs(name)
        } else if ["fn", "struct", "enum", "type", "const", "trait", "static"].contains(&kind) {
            let above = lines[..i]
                .iter()
                .rev()
                .take_while(|l| {
                    let l = l.trim_start();
                    l.starts_with("///") || l.starts_with("#[")
                })
                .count();
            lines[i - above..i].join("\n")
        } else {
            continue;
        };
        if !runnable(&doc) {
            missing.push((i + 1, *line));
        }
    }
    missing
}

/// The rule ids Rust source cites where it refuses a request: the first
/// string literal after `refuse!(`, `Error::new(` or `rule: ` when it has
/// the form of a rule id (`"kernel"` marks a refusal no rule predicted).
fn cited_rule_ids(src: &str) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for marker in ["refuse!(", "Error::new(", "rule: "] {
        let mut rest = src;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            let window: String = rest.chars().take(400).collect();
            let Some(open) = window.find('"') else {
                continue;
            };
            let lit = &window[open + 1..];
            let Some(close) = lit.find('"') else {
                continue;
            };
            let lit = &lit[..close];
            if is_rule_id(lit) {
                ids.insert(lit.to_string());
            }
        }
    }
    ids
}

/// The list the parser's hint for the unknown `line` gives after `prefix`.
fn parser_hint_list(line: &str, prefix: &str) -> String {
    let errs = gmem::scenario::parse("probe.gmem", &format!("{line}\n"))
        .expect_err("an unknown name must not parse")
        .0;
    let hint = &errs[0].hint;
    hint.strip_prefix(prefix)
        .unwrap_or_else(|| panic!("the parser's hint no longer starts `{prefix}`: {hint}"))
        .to_string()
}

/// The operations the scenario parser accepts, from the hint it gives for
/// an unknown operation.
fn parser_operations() -> Vec<String> {
    let list = parser_hint_list("no_such_operation_xyz", "operations: ");
    list.split(", ").map(|s| s.trim().to_string()).collect()
}

/// The `require` kinds the parser accepts, from its hint for an unknown one.
fn parser_require_kinds() -> Vec<String> {
    let list = parser_hint_list("require no_such_kind_xyz", "require takes ");
    let list = list.as_str();
    // "..., or any capability name (pre_fault_memory, ...)": the named
    // kinds, then the capability names the examples give.
    let (kinds, caps) = list
        .split_once(", or any capability name (")
        .unwrap_or((list, ""));
    kinds
        .split(", ")
        .map(|k| k.split(':').next().unwrap_or(k).trim().to_string())
        .chain(
            caps.trim_end_matches(')')
                .split(", ")
                .filter(|c| !c.is_empty())
                .map(str::to_string),
        )
        .collect()
}

/// The operations of `ops` that no `###` heading of `doc` names in
/// backticks.
fn undocumented(ops: &[String], doc: &str) -> Vec<String> {
    let headings: Vec<&str> = doc.lines().filter(|l| l.starts_with("### ")).collect();
    ops.iter()
        .filter(|op| {
            let quoted = format!("`{op}`");
            !headings.iter().any(|h| h.contains(&quoted))
        })
        .cloned()
        .collect()
}

/// Every id the project uses: the ids of `gmem::rules` and its own three.
fn project_ids() -> BTreeSet<String> {
    let mut ids: BTreeSet<String> = gmem::rules::ids().collect();
    for own in ["KVM-SETUP", "gmem-safety", "gmem-loop"] {
        ids.insert(own.to_string());
    }
    ids
}

fn rust_sources(under: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![under.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn no_tracked_file_points_outside_the_repository() {
    let files = tracked_files();
    assert!(
        files.iter().any(|f| f.ends_with("docs/spec.md")),
        "docs/spec.md is not among the repository's files"
    );
    let mut found = Vec::new();
    for f in files {
        // Binary files (and files missing from a work tree) have no text to check.
        let Ok(text) = std::fs::read_to_string(&f) else {
            continue;
        };
        for (line, pattern) in outside_references(&text) {
            let rel = f.strip_prefix(repo()).unwrap_or(&f).display().to_string();
            found.push(format!("{rel}:{line}: `{pattern}`"));
        }
    }
    assert!(
        found.is_empty(),
        "these lines point outside the repository; point them into docs/ instead:\n{}",
        found.join("\n")
    );
}

#[test]
fn spec_defines_every_rule_id_once() {
    let missing = not_defined_once(&project_ids(), &read("docs/spec.md"));
    assert!(
        missing.is_empty(),
        "docs/spec.md must define each id once, as the first cell of a table row; \
         (id, times defined): {missing:?}"
    );
}

#[test]
fn spec_defines_every_rule_id_the_code_cites() {
    let mut cited = BTreeSet::new();
    for f in rust_sources(&repo().join("gmem/src")) {
        cited.extend(cited_rule_ids(&std::fs::read_to_string(&f).unwrap()));
    }
    assert!(
        cited.contains("SLOT-7"),
        "the scan found no refusals: {cited:?}"
    );
    let missing = not_defined_once(&cited, &read("docs/spec.md"));
    assert!(
        missing.is_empty(),
        "gmem/src cites rule ids docs/spec.md does not define once: {missing:?}"
    );
}

#[test]
fn every_rule_that_differs_by_release_names_the_release_in_its_row() {
    let changes: Vec<(String, &str)> = gmem::release::CHANGES
        .iter()
        .flat_map(|c| c.rules().into_iter().map(|id| (id, c.since.name())))
        .collect();
    assert!(changes.len() > 10, "{changes:?}");
    let missing = release_not_in_row(&read("docs/spec.md"), &changes);
    assert!(
        missing.is_empty(),
        "these rules differ by release (gmem::release::CHANGES), but their row in docs/spec.md \
         does not say so after **By release:** naming the release: {missing:?}"
    );
}

#[test]
fn every_public_item_of_the_memory_manager_has_a_runnable_example() {
    let dir = repo().join("gmem/src/memory");
    let module_docs = |name: &str| {
        std::fs::read_to_string(dir.join(format!("{name}.rs")))
            .unwrap_or_default()
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let mut missing = Vec::new();
    let files = rust_sources(&dir);
    assert!(files.len() > 5, "{files:?}");
    for f in files {
        let src = std::fs::read_to_string(&f).unwrap();
        for (line, text) in items_without_examples(&src, &module_docs) {
            missing.push(format!("{}:{line}: {}", f.display(), text.trim()));
        }
    }
    assert!(
        missing.is_empty(),
        "public items of gmem::memory without a runnable doc example: {missing:#?}"
    );
}

#[test]
fn scenario_doc_describes_every_operation_and_requirement() {
    let ops = parser_operations();
    assert!(ops.len() > 20, "the parser lists {} operations", ops.len());
    for op in &ops {
        // Each listed name must really be an operation: alone on a line it
        // fails for its arguments, never as an unknown operation.
        if let Err(errs) = gmem::scenario::parse("probe.gmem", &format!("{op}\n")) {
            assert_ne!(
                errs.0[0].expected, "an operation",
                "`{op}` is listed but not accepted"
            );
        }
    }
    let doc = read("docs/scenarios.md");
    let missing = undocumented(&ops, &doc);
    assert!(
        missing.is_empty(),
        "docs/scenarios.md has no `### ` heading for these operations: {missing:?}"
    );
    let kinds = parser_require_kinds();
    let missing: Vec<&String> = kinds
        .iter()
        .filter(|k| !doc.contains(&format!("`{k}")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/scenarios.md does not describe these require kinds: {missing:?}"
    );
}

// The checks fail on text that breaks them.

#[test]
fn outside_references_are_found_in_any_case() {
    let text = format!(
        "fine\nsee {}\nthe {} of it\n{} 10\n{}/x\nok",
        ["spec", "/guest_memfd.md"].concat(),
        ["Steer", "ing"].concat(),
        ["Spec", " Section"].concat(),
        ["..", "/shared"].concat(),
    );
    let found: Vec<usize> = outside_references(&text).iter().map(|(l, _)| *l).collect();
    assert_eq!(found, [2, 3, 4, 5]);
    assert!(outside_references("docs/spec.md, section 4; ../docs/scenarios.md").is_empty());
}

#[test]
fn a_row_that_does_not_name_its_release_is_reported() {
    let spec = "| BIND-5 | EINVAL. **By release:** EEXIST since 7.2. | x |\n\
                | BIND-4 | past the end is EINVAL. | x |\n\
                | NUMA-2 | since 6.19 the file's. | x |\n";
    let changes = [
        ("BIND-5".to_string(), "7.2"),
        ("BIND-4".to_string(), "7.2"),
        ("NUMA-2".to_string(), "6.19"),
    ];

    let missing = release_not_in_row(spec, &changes);

    assert_eq!(
        missing,
        [
            ("BIND-4".to_string(), "7.2".to_string()),
            ("NUMA-2".to_string(), "6.19".to_string())
        ]
    );
}

#[test]
fn an_item_without_a_runnable_example_is_reported() {
    let src = "/// Has one.\n///\n/// ```\n/// f();\n/// ```\npub fn f() {}\n\
               /// None.\npub fn g() {}\n\
               /// Not run.\n/// ```no_run\n/// h();\n/// ```\n#[inline]\npub fn h() {}\n\
               fn private() {}\n\
               pub mod documented;\npub mod bare;\n";
    let docs = |name: &str| match name {
        "documented" => "//! ```\n//! x();\n//! ```".to_string(),
        _ => "//! No example.".to_string(),
    };

    let missing: Vec<usize> = items_without_examples(src, &docs)
        .iter()
        .map(|(l, _)| *l)
        .collect();

    assert_eq!(missing, [8, 14, 17]);
}

#[test]
fn an_undefined_or_twice_defined_id_is_reported() {
    let spec = "| id | rule |\n|---|---|\n| SLOT-6 | x |\n| SLOT-7 | y |\n| SLOT-7 | z |\n";
    let ids: BTreeSet<String> = ["SLOT-6", "SLOT-7", "BIND-1"].map(String::from).into();

    let bad = not_defined_once(&ids, spec);

    assert_eq!(bad, [("BIND-1".to_string(), 0), ("SLOT-7".to_string(), 2)]);
}

#[test]
fn a_cited_id_the_spec_lacks_is_reported() {
    let src = r#"
        refuse!(EINVAL, "ZZZ-9", "made up {x}", x = 1);
        return Err(Error::new(
            Errno::EFAULT,
            "gmem-nothing",
            "made up",
        ));
        Error::new(e.errno, "kernel", "refused");
        HostFault::Sigbus { offset, rule: "MMAP-3", reason };
    "#;

    let cited = cited_rule_ids(src);
    let bad = not_defined_once(&cited, &read("docs/spec.md"));

    assert_eq!(
        cited,
        ["MMAP-3", "ZZZ-9", "gmem-nothing"].map(String::from).into()
    );
    assert_eq!(
        bad,
        [("ZZZ-9".to_string(), 0), ("gmem-nothing".to_string(), 0)]
    );
}

#[test]
fn an_operation_without_a_heading_is_reported() {
    let doc = "### `create_vm`\n### `file_read`, `file_write`\ntext that names `close`\n";
    let ops = ["create_vm", "file_write", "close"].map(String::from);

    assert_eq!(undocumented(&ops, doc), ["close"]);
}
