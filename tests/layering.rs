//! The house's one direction: no module of `src/` reaches, through its imports, a module
//! that reaches it back, and the core stays in the order of `lib.rs`'s Layout table:
//! `protocol` <- `batch` <- `outbox` <- `hub` <- `node` <- `connection` / `server` / `api`.
//!
//! Read from the source text: every `crate::name` a module's non-test code mentions is
//! an edge from that module to `name`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module -> the modules its non-test code names.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut files = vec![src.clone()];
    while let Some(path) = files.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                files.push(entry.unwrap().path());
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        if first == "bin" || rel == Path::new("lib.rs") || rel == Path::new("main.rs") {
            continue;
        }
        let module = first.trim_end_matches(".rs").to_string();
        if rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let set = edges.entry(module.clone()).or_default();
        for line in code.lines() {
            let line = line.split("//").next().unwrap_or("");
            let mut rest = line;
            while let Some(at) = rest.find("crate::") {
                rest = &rest[at + "crate::".len()..];
                let names: Vec<String> = if let Some(group) = rest.strip_prefix('{') {
                    let group = group.split('}').next().unwrap_or("");
                    group
                        .split(',')
                        .map(|p| p.trim().split("::").next().unwrap_or("").to_string())
                        .collect()
                } else {
                    vec![rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect()]
                };
                for name in names {
                    if !name.is_empty() && name != module {
                        set.insert(name);
                    }
                }
            }
        }
    }
    edges
}

fn reaches(edges: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut todo = vec![from.to_string()];
    while let Some(m) = todo.pop() {
        for next in edges.get(&m).into_iter().flatten() {
            if edges.contains_key(next) && seen.insert(next.clone()) {
                todo.push(next.clone());
            }
        }
    }
    seen
}

#[test]
fn no_module_reaches_a_module_that_reaches_it_back() {
    let edges = edges();
    let mut loops = Vec::new();
    for a in edges.keys() {
        for b in reaches(&edges, a) {
            if a < &b && reaches(&edges, &b).contains(a) {
                loops.push(format!("{a} <-> {b}"));
            }
        }
    }
    assert!(
        loops.is_empty(),
        "modules in a loop: {loops:?}\nedges: {edges:#?}"
    );
}

#[test]
fn the_core_imports_point_down_the_layout() {
    let edges = edges();
    let order = ["protocol", "batch", "outbox", "hub", "node"];
    for (i, module) in order.iter().enumerate() {
        let reached = reaches(&edges, module);
        for above in &order[i + 1..] {
            assert!(
                !reached.contains(*above),
                "{module} reaches {above}, which sits above it"
            );
        }
        for top in ["connection", "server", "api", "features", "cluster", "demo"] {
            assert!(!reached.contains(top), "{module} reaches {top}");
        }
    }
    assert!(reaches(&edges, "hub").contains("outbox"));
    assert!(reaches(&edges, "node").contains("hub"));
    assert!(
        !reaches(&edges, "web").contains("api"),
        "web needs nothing of api"
    );
}
