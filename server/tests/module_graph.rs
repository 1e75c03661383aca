//! No two top-level modules of the server import each other, directly or through others: the
//! state (`app`) knows no handler, the router (`router`) puts handlers and state together, and
//! everything else depends one way. Read from the source tree: every `crate::name` path outside
//! `//` comments counts as an import of `name`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules (`src/x.rs`, `src/x/`) and the files of each.
fn modules(src: &Path) -> BTreeMap<String, Vec<PathBuf>> {
    let mut modules: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    for entry in std::fs::read_dir(src).expect("read src/") {
        let path = entry.expect("a src/ entry").path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()).map(str::to_owned) else {
            continue;
        };
        if path.is_dir() {
            let files = modules.entry(stem).or_default();
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") && stem != "lib" && stem != "main" {
            modules.entry(stem).or_default().push(path);
        }
    }
    modules
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read a module folder") {
        let path = entry.expect("a folder entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The names that follow `crate::` in `code`: `crate::a::b` gives `a`, `crate::{a, b::c}` gives
/// `a` and `b` (only the group's first level).
fn crate_paths(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let Some(group) = rest.strip_prefix('{') else {
            names.insert(ident(rest));
            continue;
        };
        let mut depth = 0;
        let mut item_start = true;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => item_start = true,
                c if c.is_whitespace() => {}
                _ if item_start && depth == 0 => {
                    names.insert(ident(&group[i..]));
                    item_start = false;
                }
                _ => {}
            }
        }
    }
    names
}

#[test]
fn top_level_modules_import_each_other_in_no_circle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    assert!(modules.contains_key("app") && modules.contains_key("router"));
    let mut imports: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (name, files) in &modules {
        let mut used = BTreeSet::new();
        for file in files {
            let text = std::fs::read_to_string(file).expect("read a source file");
            let code: String = text
                .lines()
                .map(|line| line.split("//").next().unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n");
            used.extend(crate_paths(&code));
        }
        used.retain(|used| used != name && modules.contains_key(used));
        imports.insert(name, used);
    }
    // Depth-first search for a path back to where it started.
    fn circle<'a>(
        imports: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        let last = *path.last().expect("a non-empty path");
        for next in &imports[last] {
            if next == path[0] {
                let mut found: Vec<String> = path.iter().map(|m| m.to_string()).collect();
                found.push(next.clone());
                return Some(found);
            }
            if path.contains(&next.as_str()) {
                continue;
            }
            path.push(next);
            if let Some(found) = circle(imports, path) {
                return Some(found);
            }
            path.pop();
        }
        None
    }
    for start in imports.keys() {
        if let Some(found) = circle(&imports, &mut vec![start]) {
            panic!(
                "modules import each other in a circle: {}",
                found.join(" -> ")
            );
        }
    }
}

#[test]
fn crate_paths_reads_plain_and_grouped_imports() {
    let code = "use crate::app::AppState;\nuse crate::{api, ops::{self, x}, ws};\nlet m = crate::metrics::X;";
    let expected: BTreeSet<String> = ["api", "app", "metrics", "ops", "ws"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(crate_paths(code), expected);
}
