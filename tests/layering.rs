//! The house's checks, read from the source as Rust (`syn`), not as text:
//!
//! - one direction: no module of `src/` reaches, through its imports, a module that
//!   reaches it back; the core stays in the order of `lib.rs`'s Layout table
//!   (`protocol` <- `batch` <- `outbox` <- `hub` <- `node` <- `connection` / `server` /
//!   `api`); the leaves (`config`, `metrics`, `throttle`, `tls`) import nothing of ours
//!   but other leaves and `protocol`, which imports nothing; `broker` and `hub` never
//!   see each other;
//! - sizes: no file under `src/` over 600 lines (an inline test module counts), no
//!   function over 100 lines outside tests.
//!
//! An edge is any path to `crate::name` (or `super::name` out of a top module) in a
//! module's non-test items: `use` trees of any shape and nesting, and paths in code.
//! Items under `#[cfg(test)]` and files named `tests.rs` are tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Every `.rs` file under `src/` but the binaries' and the crate roots, with the path
/// of its module (`broker::redis::core`).
fn source_files() -> Vec<(PathBuf, Vec<String>)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut todo = vec![src.clone()];
    while let Some(path) = todo.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                todo.push(entry.unwrap().path());
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let rel = path.strip_prefix(&src).unwrap().to_path_buf();
        let mut module: Vec<String> = rel
            .iter()
            .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_string())
            .collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        out.push((path, module));
    }
    out.sort();
    out
}

fn parse(path: &Path) -> syn::File {
    let text = std::fs::read_to_string(path).unwrap();
    syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn is_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("test")
            || (a.path().is_ident("cfg")
                && a.parse_args::<syn::Meta>()
                    .is_ok_and(|m| m.path().is_ident("test")))
    })
}

/// Collects the top modules a file's non-test items name.
struct Names<'a> {
    /// The file's module path (`["broker", "redis", "core"]`).
    module: &'a [String],
    found: BTreeSet<String>,
}

impl Names<'_> {
    /// The top module a path starting with `first` (then `rest`) leads to, if it leaves
    /// the crate root for one of ours.
    fn note(&mut self, segments: &[String]) {
        let mut at: Vec<String> = self.module.to_vec();
        let mut rest = segments;
        match rest.first().map(String::as_str) {
            Some("crate") => {
                at.clear();
                rest = &rest[1..];
            }
            Some("super") | Some("self") => {
                while let Some(first) = rest.first() {
                    match first.as_str() {
                        "super" => {
                            at.pop();
                        }
                        "self" => {}
                        _ => break,
                    }
                    rest = &rest[1..];
                }
            }
            _ => return,
        }
        let top = if at.is_empty() {
            rest.first().cloned()
        } else {
            at.first().cloned()
        };
        if let Some(top) = top {
            if top != self.module[0] {
                self.found.insert(top);
            }
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.note(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.note(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => {
                prefix.push("*".into());
                self.note(prefix);
                prefix.pop();
            }
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(prefix, tree);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Names<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Mod(m) => &m.attrs,
            syn::Item::Fn(f) => &f.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Use(u) => &u.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if !is_test(attrs) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &item.tree);
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.note(&segments);
        syn::visit::visit_path(self, path);
    }
}

/// Top module -> the top modules its non-test code names.
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, module) in source_files() {
        let top = &module[0];
        if top == "bin"
            || top == "lib"
            || top == "main"
            || module.last().is_some_and(|m| m == "tests")
        {
            continue;
        }
        let mut names = Names {
            module: &module,
            found: BTreeSet::new(),
        };
        names.visit_file(&parse(&path));
        edges.entry(top.clone()).or_default().extend(names.found);
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
fn multi_line_groups_and_test_modules_are_read_as_rust() {
    let module = ["outbox".to_string(), "write".to_string()];
    let file: syn::File = syn::parse_str(
        "use crate::{\n    batch::Pace,\n    protocol::{self, Encoded},\n};\nfn f() { let _ = super::super::hub::Hub::new(); }\n#[cfg(test)]\nmod tests { use crate::node::Node; }",
    )
    .unwrap();
    let mut names = Names {
        module: &module,
        found: BTreeSet::new(),
    };
    names.visit_file(&file);
    let found: Vec<&str> = names.found.iter().map(String::as_str).collect();
    assert_eq!(found, ["batch", "hub", "protocol"]);
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
        for top in ["connection", "server", "api", "features", "reports", "demo"] {
            assert!(!reached.contains(top), "{module} reaches {top}");
        }
    }
    assert!(reaches(&edges, "hub").contains("outbox"));
    assert!(reaches(&edges, "node").contains("hub"));
    assert!(reaches(&edges, "node").contains("broker"));
    assert!(
        !reaches(&edges, "web").contains("api"),
        "web needs nothing of api"
    );
}

#[test]
fn leaves_import_nothing_of_ours_above_them() {
    let edges = edges();
    let leaves = ["config", "metrics", "throttle", "tls"];
    // `protocol` imports nothing of ours: the bottom, below the leaves too.
    assert!(
        reaches(&edges, "protocol").is_empty(),
        "protocol imports {:?}",
        edges["protocol"]
    );
    for leaf in leaves {
        let above: Vec<String> = reaches(&edges, leaf)
            .into_iter()
            .filter(|m| !leaves.contains(&m.as_str()) && m != "protocol")
            .collect();
        assert!(above.is_empty(), "the leaf {leaf} reaches {above:?}");
    }
}

#[test]
fn broker_and_hub_never_see_each_other() {
    let edges = edges();
    assert!(
        !reaches(&edges, "broker").contains("hub"),
        "broker reaches hub: {:?}",
        edges["broker"]
    );
    assert!(
        !reaches(&edges, "hub").contains("broker"),
        "hub reaches broker: {:?}",
        edges["hub"]
    );
}

/// Each function item (free, in an impl, a trait's default) outside tests: its name and
/// its lines.
struct Functions {
    found: Vec<(String, usize)>,
}

impl Functions {
    fn note(&mut self, name: &syn::Ident, block: &syn::Block) {
        let span = block.brace_token.span.join();
        let lines = span.end().line - span.start().line + 1;
        self.found.push((name.to_string(), lines));
    }
}

impl<'ast> Visit<'ast> for Functions {
    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if !is_test(&m.attrs) {
            syn::visit::visit_item_mod(self, m);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        if !is_test(&f.attrs) {
            self.note(&f.sig.ident, &f.block);
            syn::visit::visit_item_fn(self, f);
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        if !is_test(&f.attrs) {
            self.note(&f.sig.ident, &f.block);
            syn::visit::visit_impl_item_fn(self, f);
        }
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(block) = &f.default {
            self.note(&f.sig.ident, block);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

#[test]
fn no_file_over_600_lines_and_no_function_over_100() {
    let mut big = Vec::new();
    for (path, module) in source_files() {
        let name = module.join("::");
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        if lines > 600 {
            big.push(format!("{name}: {lines} lines"));
        }
        if module.last().is_some_and(|m| m == "tests") {
            continue;
        }
        let mut functions = Functions { found: Vec::new() };
        functions.visit_file(&parse(&path));
        for (function, lines) in functions.found {
            if lines > 100 {
                big.push(format!("{name}::{function}: a function of {lines} lines"));
            }
        }
    }
    assert!(big.is_empty(), "too big: {big:#?}");
}
