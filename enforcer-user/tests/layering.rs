//! The library's top-level modules depend on each other one way: no two
//! import each other (directly or round a longer loop), nothing but the
//! binary reaches into a mode, and the settings import nothing of the crate.
//! Read from the source, so a new `use` that breaks the order fails here.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

/// The modes: only the binary picks one.
const MODES: [&str; 2] = ["standalone", "k8s"];

/// Modules that import nothing else of the crate.
const LEAVES: [&str; 1] = ["config"];

fn source_files(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            source_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The top-level modules a file names through `crate::`: paths such as
/// `crate::bpf::owner::X` and each branch of `use crate::{a::X, b};`.
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded_by_ident = rest[..at].chars().next_back().is_some_and(is_ident);
        rest = &rest[at + "crate::".len()..];
        if preceded_by_ident {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            // The top-level branches of the group, up to its closing brace.
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        rest = &group[i..];
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && is_ident(c) => {
                        let name: String =
                            group[i..].chars().take_while(|c| is_ident(*c)).collect();
                        found.insert(name);
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = rest.chars().take_while(|c| is_ident(*c)).collect();
            found.insert(name);
        }
    }
    found
}

/// Code without `//` comments (doc comments may name paths in prose).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| line.split_once("//").map_or(line, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Top-level module -> the top-level modules it names.
fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    source_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let relative = file.strip_prefix(&src).expect("under src");
        let first = relative.components().next().expect("a component");
        let module = first
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(&file).expect("read source");
        let uses = graph.entry(module.clone()).or_default();
        uses.extend(
            crate_references(&without_comments(&text))
                .into_iter()
                .filter(|m| *m != module),
        );
    }
    graph
}

/// A loop of imports through `module`, if there is one.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    path: &mut Vec<String>,
) -> Option<Vec<String>> {
    let last = path.last().expect("a start").clone();
    for next in graph.get(&last).into_iter().flatten() {
        if let Some(at) = path.iter().position(|m| m == next) {
            let mut cycle = path[at..].to_vec();
            cycle.push(next.clone());
            return Some(cycle);
        }
        path.push(next.clone());
        if let Some(cycle) = cycle_from(graph, path) {
            return Some(cycle);
        }
        path.pop();
    }
    None
}

#[test]
fn the_reference_reader_sees_paths_and_groups() {
    let code = "use crate::{\n    app::{Daemon, X},\n    bpf::owner::E,\n    config::{self, a::{b, c}},\n};\nuse crate::host::kernel;\nfn f() { crate::report::x(); my_crate::nope(); }";
    let found: Vec<String> = crate_references(code).into_iter().collect();
    assert_eq!(found, ["app", "bpf", "config", "host", "report"]);
}

#[test]
fn modules_import_each_other_one_way() {
    let graph = module_graph();
    assert!(graph.len() >= 7, "{graph:?}");
    for module in graph.keys() {
        let cycle = cycle_from(&graph, &mut vec![module.clone()]);
        assert!(
            cycle.is_none(),
            "import cycle: {}",
            cycle.unwrap_or_default().join(" -> ")
        );
    }
    for (module, uses) in &graph {
        for mode in MODES {
            assert!(
                module == mode || !uses.contains(mode),
                "{module} reaches into the {mode} mode: {uses:?}"
            );
        }
    }
    for leaf in LEAVES {
        assert_eq!(
            graph.get(leaf),
            Some(&BTreeSet::new()),
            "{leaf} imports {graph:?}"
        );
    }
}
