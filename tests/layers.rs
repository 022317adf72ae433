//! The map in `src/lib.rs` stays true: the top-level modules of `src/` import
//! each other without a cycle, every import points down the layers its
//! `Layers:` line states, and the `# Layout` section names every module
//! `lib.rs` declares.
//!
//! An edge `a -> b` is any `crate::b` path written in a file of module `a`
//! (`src/a.rs` or `src/a/**`), including the names inside a
//! `use crate::{b, c::d}` group; comments are skipped. Reads the source only.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level modules: `src/X.rs` and `src/X/`, without `lib`, `main` and
/// the binaries.
fn modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .expect("src/")
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            if e.path().is_dir() {
                (name != "bin").then_some(name)
            } else {
                let m = name.strip_suffix(".rs")?;
                (m != "lib" && m != "main").then(|| m.to_owned())
            }
        })
        .collect()
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for e in std::fs::read_dir(path).expect("dir").flatten() {
            rust_files(&e.path(), out);
        }
    } else if path.is_file() && path.extension().is_some_and(|x| x == "rs") {
        out.push(path.to_owned());
    }
}

/// The crate-internal modules a file's text names, each with the line that
/// names it first.
fn references(text: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let code: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = BTreeMap::new();
    let mut note = |name: &str, why: &str| {
        if modules.contains(name) {
            out.entry(name.to_owned())
                .or_insert_with(|| why.trim().chars().take(100).collect());
        }
    };
    let mut rest = code.as_str();
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let line_start = rest[..i].rfind('\n').map_or(0, |n| n + 1);
        let line_end = rest[i..].find('\n').map_or(rest.len(), |n| i + n);
        let line = &rest[line_start..line_end];
        if let Some(group) = after.strip_prefix('{') {
            // `use crate::{a, b::c, d::{e, f}}`: the first segment of each
            // top-level entry.
            let mut depth = 0;
            let mut entry_start = true;
            let mut word = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => entry_start = true,
                    c if entry_start && (c.is_alphanumeric() || c == '_') => word.push(c),
                    _ if entry_start && !word.is_empty() => {
                        note(&word, line);
                        word.clear();
                        entry_start = false;
                    }
                    _ => {}
                }
            }
            if !word.is_empty() {
                note(&word, line);
            }
        } else {
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            note(&name, line);
        }
        rest = after;
    }
    out
}

fn graph(src: &Path) -> Graph {
    let modules = modules(src);
    let mut graph = Graph::new();
    for m in &modules {
        let mut files = Vec::new();
        rust_files(&src.join(format!("{m}.rs")), &mut files);
        rust_files(&src.join(m), &mut files);
        let edges = graph.entry(m.clone()).or_default();
        for file in files {
            let text = std::fs::read_to_string(&file).expect("read");
            for (to, line) in references(&text, &modules) {
                if to != *m {
                    let rel = file
                        .strip_prefix(src)
                        .unwrap_or(&file)
                        .display()
                        .to_string();
                    edges.entry(to).or_insert(format!("src/{rel}: {line}"));
                }
            }
        }
    }
    graph
}

/// The cycles of a graph: its strongly connected components of more than one
/// module (Tarjan), each sorted.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn strong<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in s.graph.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                strong(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            strong(&mut state, v);
        }
    }
    state.out
}

#[test]
fn the_modules_of_src_import_each_other_without_a_cycle() {
    let graph = graph(&src());
    assert!(graph.len() > 10, "found only {} modules", graph.len());
    let found = cycles(&graph);
    let explain: Vec<String> = found
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| {
                    graph[a]
                        .iter()
                        .filter(|(b, _)| c.contains(b))
                        .map(move |(b, why)| format!("    {a} -> {b}  ({why})"))
                })
                .collect();
            format!("cycle {}:\n{}", c.join(" <-> "), edges.join("\n"))
        })
        .collect();
    assert!(
        found.is_empty(),
        "dependencies must point one way (src/lib.rs, # Layout):\n{}",
        explain.join("\n")
    );
}

#[test]
fn the_cycle_check_sees_an_import_through_a_group_and_a_path() {
    let modules: BTreeSet<String> = ["a", "b", "c"].map(str::to_owned).into();
    let refs = references(
        "// crate::c in a comment\nuse crate::{b::X, other};\nfn f() { crate::c::g() }",
        &modules,
    );
    assert_eq!(refs.keys().collect::<Vec<_>>(), ["b", "c"]);
    let mut g = Graph::new();
    g.entry("a".into())
        .or_default()
        .insert("b".into(), String::new());
    g.entry("b".into())
        .or_default()
        .insert("c".into(), String::new());
    g.entry("c".into()).or_default();
    assert!(cycles(&g).is_empty());
    g.entry("c".into())
        .or_default()
        .insert("a".into(), String::new());
    assert_eq!(
        cycles(&g),
        vec![vec!["a".to_owned(), "b".into(), "c".into()]]
    );
}

#[test]
fn the_layout_of_lib_rs_names_every_module() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("src/lib.rs");
    let layout: String = lib
        .lines()
        .skip_while(|l| !l.starts_with("//! # Layout"))
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(!layout.is_empty(), "src/lib.rs has no # Layout section");
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ")?.strip_suffix(';'))
        .collect();
    assert!(declared.len() > 10);
    let missing: Vec<&&str> = declared
        .iter()
        .filter(|m| !layout.contains(&format!("[`{m}`]")))
        .collect();
    assert!(missing.is_empty(), "# Layout does not name {missing:?}");
}

/// The layer of each module, from the `Layers:` line of `src/lib.rs`'s
/// `# Layout` (lowest first, `|` between layers).
fn layers(lib: &str) -> BTreeMap<String, usize> {
    let line = lib
        .lines()
        .find_map(|l| l.strip_prefix("//! Layers:"))
        .expect("src/lib.rs states its layers on a `//! Layers:` line");
    line.split('|')
        .enumerate()
        .flat_map(|(rank, names)| names.split_whitespace().map(move |m| (m.to_owned(), rank)))
        .collect()
}

#[test]
fn every_import_points_down_the_layers_lib_rs_states() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).expect("src/lib.rs");
    let rank = layers(&lib);
    let graph = graph(&src());
    let unranked: Vec<&String> = graph.keys().filter(|m| !rank.contains_key(*m)).collect();
    assert!(
        unranked.is_empty(),
        "the Layers line does not name {unranked:?}"
    );
    let upward: Vec<String> = graph
        .iter()
        .flat_map(|(a, edges)| {
            let rank = &rank;
            edges
                .iter()
                .filter(move |(b, _)| rank[*b] >= rank[a])
                .map(move |(b, why)| format!("    {a} -> {b}  ({why})"))
        })
        .collect();
    assert!(
        upward.is_empty(),
        "imports against the layers of src/lib.rs (a module imports only lower layers):\n{}",
        upward.join("\n")
    );
}

#[test]
fn the_layer_check_reads_the_order_and_sees_an_upward_import() {
    let rank = layers("//! Layers: a b | c | d\n");
    assert_eq!(rank["a"], 0);
    assert_eq!(rank["b"], 0);
    assert_eq!(rank["d"], 2);
    assert!(rank["c"] > rank["b"], "c may import b");
    assert!(rank["a"] >= rank["b"], "a may not import b, its own layer");
}
