//! Embeds the scenario corpus in the binary, so that an installed `gmem
//! check` finds it wherever it runs (the departures file is built into the
//! gmem library).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            walk(&e, out);
        } else if e.extension().is_some_and(|x| x == "gmem") {
            out.push(e);
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let corpus = manifest
        .join("../scenarios")
        .canonicalize()
        .expect("the scenarios folder");
    println!("cargo:rerun-if-changed={}", corpus.display());
    let mut files = Vec::new();
    walk(&corpus, &mut files);
    let mut code = String::from("/// The corpus: (path relative to scenarios/, text).\n");
    code.push_str("pub const FILES: &[(&str, &str)] = &[\n");
    for f in &files {
        let rel = f.strip_prefix(&corpus).expect("under the corpus");
        let rel = rel.to_str().expect("UTF-8 path").replace('\\', "/");
        let _ = writeln!(
            code,
            "    ({rel:?}, include_str!({:?})),",
            f.display().to_string()
        );
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("corpus.rs");
    std::fs::write(&out, code).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
