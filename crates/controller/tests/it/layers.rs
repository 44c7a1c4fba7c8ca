//! The controller's layering, checked on its source: model → lifecycle → store → app →
//! front ends, arrows one way. A `crate::x` path in a module's production code (tests and
//! comments aside) is an import of `x`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Production files over this many lines need a reason here.
const MAX_LINES: usize = 600;
/// Files still over [`MAX_LINES`], each with why it has not been split yet.
const LONG_FILES: &[(&str, &str)] = &[];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The production part of a file: up to its test module, comment lines dropped.
fn production(text: &str) -> Vec<&str> {
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect()
}

fn crate_paths(line: &str) -> impl Iterator<Item = String> + '_ {
    line.match_indices("crate::").filter_map(move |(at, _)| {
        if line[..at].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            return None; // e.g. `miglet_crate::`, not ours
        }
        let rest = &line[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
            .collect();
        (!name.is_empty()).then_some(name)
    })
}

struct Source {
    graph: Graph,
    lines: BTreeMap<String, usize>,
}

fn read_source() -> Source {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    assert!(
        files.len() > 20,
        "found only {} files under {}",
        files.len(),
        src.display()
    );
    let mut graph = Graph::new();
    let mut lines = BTreeMap::new();
    for file in files {
        let rel = file
            .strip_prefix(&src)
            .unwrap_or(&file)
            .to_string_lossy()
            .into_owned();
        let top = rel
            .split('/')
            .next()
            .unwrap_or_default()
            .trim_end_matches(".rs")
            .to_owned();
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let code = production(&text);
        lines.insert(rel.clone(), code.len());
        if top == "lib" || top == "main" {
            continue;
        }
        let deps = graph.entry(top.clone()).or_default();
        for line in &code {
            for dep in crate_paths(line) {
                if dep != top {
                    deps.insert(dep);
                }
            }
        }
    }
    Source { graph, lines }
}

/// A cycle through `start`, if there is one.
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flatten() {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_owned()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn no_module_imports_itself_through_others() {
    let source = read_source();
    let cycles: Vec<String> = source
        .graph
        .keys()
        .filter_map(|m| cycle_from(&source.graph, m))
        .map(|c| format!("{} -> {}", c.join(" -> "), c[0]))
        .collect();
    assert!(
        cycles.is_empty(),
        "import circles between the controller's modules:\n{}",
        cycles.join("\n")
    );
}

#[test]
fn the_model_and_the_rules_sit_at_the_bottom() {
    let source = read_source();
    let model = source.graph.get("model").cloned().unwrap_or_default();
    assert!(
        model.is_empty(),
        "model must import nothing of the controller, imports {model:?}"
    );
    let lifecycle = source.graph.get("lifecycle").cloned().unwrap_or_default();
    assert!(
        lifecycle.iter().all(|m| m == "model"),
        "lifecycle may import only model, imports {lifecycle:?}"
    );
    for low in ["model", "lifecycle", "store"] {
        let deps = source.graph.get(low).cloned().unwrap_or_default();
        for front in ["app", "http", "grpc", "admin", "server"] {
            assert!(
                !deps.contains(front),
                "{low} imports {front}, a layer above it"
            );
        }
    }
}

#[test]
fn production_files_stay_small() {
    let source = read_source();
    let long: Vec<String> = source
        .lines
        .iter()
        .filter(|(file, n)| **n > MAX_LINES && !LONG_FILES.iter().any(|(f, _)| f == file))
        .map(|(file, n)| format!("{file}: {n} lines"))
        .collect();
    assert!(
        long.is_empty(),
        "split these (or say why in LONG_FILES):\n{}",
        long.join("\n")
    );
    for (file, _) in LONG_FILES {
        assert!(
            source.lines.get(*file).is_some_and(|n| *n > MAX_LINES),
            "{file} is no longer long: drop it from LONG_FILES"
        );
    }
}

#[test]
fn the_checker_sees_a_circle() {
    let mut graph = Graph::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("a".into());
    graph.entry("c".into()).or_default().insert("a".into());
    assert!(cycle_from(&graph, "a").is_some());
    assert!(cycle_from(&graph, "c").is_none());
    assert_eq!(
        crate_paths("use crate::store::{Store};").collect::<Vec<_>>(),
        ["store"]
    );
    assert_eq!(crate_paths("x = my_crate::store;").count(), 0);
}

#[test]
fn front_ends_read_through_the_read_handle_and_write_through_the_app() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src.join("admin"), &mut files);
    files.extend(
        ["http.rs", "grpc.rs", "dashboard.rs", "server.rs", "main.rs"].map(|f| src.join(f)),
    );
    let mut leaks = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for line in production(&text) {
            if line.contains(".store()") || line.contains("Mutation::") {
                leaks.push(format!("{}: {}", file.display(), line.trim()));
            }
        }
    }
    assert!(files.len() > 5, "found only {files:?}");
    assert!(
        leaks.is_empty(),
        "front ends use Controller::reads() and the app's operations:\n{}",
        leaks.join("\n")
    );
}

/// Production functions over this many lines need `on purpose` (and why) in their doc.
const MAX_FN_LINES: usize = 85;

/// `(name, lines, doc)` of each function in `text`'s production part: from its `fn` line to
/// the line that closes its body (brace counting; good enough for our own formatted code).
fn functions(text: &str) -> Vec<(String, usize, String)> {
    let lines: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let t = line.trim_start();
        let Some(at) = t.find("fn ") else { continue };
        let head = &t[..at];
        let is_fn = head
            .split_whitespace()
            .all(|w| matches!(w, "pub" | "async" | "const" | "unsafe") || w.starts_with("pub("));
        if !is_fn || t.starts_with("//") {
            continue;
        }
        let name: String = t[at + 3..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let (mut depth, mut opened, mut end) = (0i64, false, None);
        for (j, l) in lines.iter().enumerate().skip(i) {
            for c in l.chars() {
                match c {
                    '{' => {
                        depth += 1;
                        opened = true;
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            if opened && depth <= 0 {
                end = Some(j);
                break;
            }
            if !opened && l.trim_end().ends_with(';') {
                break;
            }
        }
        let Some(end) = end else { continue };
        let doc: Vec<&str> = lines[..i]
            .iter()
            .rev()
            .take_while(|l| {
                let l = l.trim_start();
                l.starts_with("///") || l.starts_with("#[")
            })
            .copied()
            .collect();
        out.push((name, end - i + 1, doc.join("\n")));
    }
    out
}

#[test]
fn production_functions_stay_short_or_say_why() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut long = Vec::new();
    let mut seen = 0;
    for file in &files {
        let name = file
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name == "tests.rs" || name == "props.rs" {
            continue; // test modules
        }
        let text = std::fs::read_to_string(file).unwrap_or_default();
        for (f, n, doc) in functions(&text) {
            seen += 1;
            if n > MAX_FN_LINES && !doc.contains("on purpose") {
                long.push(format!("{}::{f}: {n} lines", file.display()));
            }
        }
    }
    assert!(seen > 500, "found only {seen} functions");
    assert!(
        long.is_empty(),
        "split these (or say why, `on purpose`, in their doc):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_function_checker_measures_bodies() {
    let text = "/// doc\npub async fn a(x: u8) -> u8 {\n    if x > 0 {\n        1\n    } else {\n        0\n    }\n}\nfn b();\n";
    let found = functions(text);
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].0.as_str(), found[0].1), ("a", 7));
    assert_eq!(found[0].2, "/// doc");
}
