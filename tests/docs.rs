//! Keeps the documentation true and usable from a clone of the repository:
//!
//! - every config key `src/config/raw.rs` defines is documented in `docs/configuration.md`, in
//!   the section for its table (`[agent]`, `[accounts.NAME]`, `[[accounts.NAME.jobs]]`);
//! - no tracked file points at files outside the repository;
//! - the README stays short;
//! - every relative link in the README and in `docs/` leads to a file that exists, and to a
//!   heading that exists when it names one.
//!
//! The config module collects its "did you mean" lists from serde's own field lists
//! (`config::problems::field_names`), but that module is private to the crate. So the keys are
//! read from the source of `raw.rs` itself: every `#[derive(Deserialize)]` struct with named
//! fields is one table, its doc comment's first `` `[…]` `` names the table, and each field
//! (or its `#[serde(rename = "…")]`) is a key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// One config table as `raw.rs` defines it.
#[derive(Debug)]
struct RawTable {
    /// The struct's name (`RawAgent`).
    name: String,
    /// The table its doc comment names first (`[agent]`), if any.
    table: Option<String>,
    /// The keys it accepts, in source order.
    keys: Vec<String>,
}

/// The `#[derive(Deserialize)]` structs with named fields in `source` (the text of `raw.rs`).
fn raw_tables(source: &str) -> Vec<RawTable> {
    let lines: Vec<&str> = source.lines().collect();
    let mut tables = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let line = line.trim();
        let Some(rest) = line
            .strip_prefix("pub struct ")
            .or_else(|| line.strip_prefix("struct "))
        else {
            continue;
        };
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !rest[name.len()..].trim_start().starts_with('{') {
            continue; // a tuple or unit struct: no keys of its own
        }
        // Its attributes and doc comment, read upwards.
        let (mut derives, mut docs) = (false, Vec::new());
        for above in lines[..i].iter().rev().map(|l| l.trim()) {
            if above.starts_with("#[") {
                derives |= above.contains("derive") && above.contains("Deserialize");
                assert!(
                    !above.contains("rename_all"),
                    "{name}: #[serde(rename_all)] is not understood by this test; extend it"
                );
            } else if let Some(doc) = above.strip_prefix("///") {
                docs.push(doc.trim());
            } else {
                break;
            }
        }
        if !derives {
            continue;
        }
        docs.reverse();
        let table = docs.join(" ").split('`').find_map(|span| {
            (span.starts_with('[') && span.ends_with(']')).then(|| span.to_owned())
        });
        tables.push(RawTable {
            name,
            table,
            keys: struct_keys(&lines[i + 1..]),
        });
    }
    tables
}

/// The keys of the struct whose body starts at `body` (the line after its `{`).
fn struct_keys(body: &[&str]) -> Vec<String> {
    let mut keys = Vec::new();
    let mut depth = 1usize;
    let (mut rename, mut skip) = (None::<String>, false);
    for line in body {
        let line = line.trim();
        if line.starts_with("//") {
            continue;
        }
        if depth == 1 && line.starts_with("#[serde(") {
            assert!(
                !line.contains("flatten"),
                "#[serde(flatten)] is not understood by this test; extend it: {line}"
            );
            skip |= line.contains("skip");
            if let Some(rest) = line.split("rename = \"").nth(1) {
                rename = rest.split('"').next().map(str::to_owned);
            }
        } else if depth == 1 && !line.starts_with('#') {
            let field = line
                .strip_prefix("pub(crate) ")
                .or_else(|| line.strip_prefix("pub "))
                .unwrap_or(line);
            let ident: String = field
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !ident.is_empty() && field[ident.len()..].trim_start().starts_with(':') {
                if !skip {
                    keys.push(rename.take().unwrap_or(ident));
                }
                (rename, skip) = (None, false);
            }
        }
        depth += line.matches('{').count();
        depth = depth.saturating_sub(line.matches('}').count());
        if depth == 0 {
            break;
        }
    }
    keys
}

/// A Markdown file's ATX headings outside code blocks: (line index, level, text).
fn headings(text: &str) -> Vec<(usize, usize, String)> {
    outside_code_blocks(text)
        .filter_map(|(i, line)| {
            let level = line.chars().take_while(|c| *c == '#').count();
            let rest = &line[level..];
            ((1..=6).contains(&level) && (rest.is_empty() || rest.starts_with(' '))).then(|| {
                (
                    i,
                    level,
                    rest.trim().trim_end_matches('#').trim().to_owned(),
                )
            })
        })
        .collect()
}

/// The lines of `text` that are not inside a fenced code block, with their index.
fn outside_code_blocks(text: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut fenced = false;
    text.lines().enumerate().filter(move |(_, line)| {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            return false;
        }
        !fenced
    })
}

/// The text of the section under the heading that contains `` `marker` ``: up to the next
/// heading of the same or a higher level.
fn section(doc: &str, marker: &str) -> Option<String> {
    let wanted = format!("`{marker}`");
    let all = headings(doc);
    let (start, level, _) = all.iter().find(|(_, _, text)| text.contains(&wanted))?;
    let end = all
        .iter()
        .find(|(i, l, _)| i > start && l <= level)
        .map_or(usize::MAX, |(i, _, _)| *i);
    let lines: Vec<&str> = doc.lines().collect();
    Some(lines[*start..end.min(lines.len())].join("\n"))
}

#[test]
fn every_config_key_is_documented_in_its_section() {
    let raw = read(&root().join("src/config/raw.rs"));
    let doc = read(&root().join("docs/configuration.md"));
    let tables = raw_tables(&raw);
    // Guard against a parser that finds nothing and so proves nothing.
    let total: usize = tables.iter().map(|t| t.keys.len()).sum();
    assert!(
        tables.len() >= 3 && total >= 30,
        "read only {} tables with {total} keys from src/config/raw.rs: {tables:?}",
        tables.len()
    );
    let mut missing = Vec::new();
    for t in &tables {
        assert!(!t.keys.is_empty(), "{} has no keys: {t:?}", t.name);
        let (place, text) = match &t.table {
            Some(table) => {
                let text = section(&doc, table).unwrap_or_else(|| {
                    panic!(
                        "docs/configuration.md has no heading with `{table}` (the table {} \
                         defines)",
                        t.name
                    )
                });
                (format!("section `{table}`"), text)
            }
            None => ("anywhere".to_owned(), doc.clone()),
        };
        for key in &t.keys {
            if !text.contains(&format!("`{key}`")) {
                missing.push(format!("`{key}` ({}) in {place}", t.name));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "config keys defined in src/config/raw.rs but not documented in docs/configuration.md:\n  {}",
        missing.join("\n  ")
    );
}

#[test]
fn the_key_reader_finds_keys_and_renames() {
    let source = r#"
/// `[demo]`: a table.
#[derive(Deserialize)]
pub struct RawDemo {
    /// A key with `{ braces }` in its doc.
    pub first: Option<String>,
    #[serde(rename = "second-key")]
    pub second: Option<BTreeMap<String, u32>>,
    #[serde(skip)]
    pub hidden: u8,
    pub jobs: Vec<config::Value>,
}

/// Not a table.
pub struct Wrapped(pub u32);

#[derive(Debug)]
pub struct NotDeserialized {
    pub x: u8,
}
"#;
    let tables = raw_tables(source);
    assert_eq!(tables.len(), 1, "{tables:?}");
    assert_eq!(tables[0].table.as_deref(), Some("[demo]"));
    assert_eq!(tables[0].keys, ["first", "second-key", "jobs"]);
    let doc = "# Config\n\n## `[demo]`\n\n`first`\n\n```toml\n# not a heading\n```\n\n## Other\n\n`jobs`\n";
    let text = section(doc, "[demo]").unwrap();
    assert!(
        text.contains("`first`") && !text.contains("`jobs`"),
        "{text}"
    );
}

/// Tracked files, from `git ls-files`; `None` outside a git checkout.
fn tracked_files() -> Option<Vec<PathBuf>> {
    let out = Command::new("git")
        .args(["ls-files", "-z"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(
        out.stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| root().join(String::from_utf8_lossy(p).as_ref()))
            .collect(),
    )
}

#[test]
fn no_tracked_file_points_outside_the_repository() {
    let Some(files) = tracked_files() else {
        eprintln!("not a git checkout: skipping the check of tracked files");
        return;
    };
    // Built here so that this file does not match itself.
    let forbidden = [
        ["..", "shared"].join("/"),
        ["shared", "seeds"].join("/"),
        ["shared", "DESIGN"].join("/"),
    ];
    let mut found = Vec::new();
    for path in files {
        let Ok(bytes) = std::fs::read(&path) else {
            continue; // deleted in the work tree
        };
        if bytes.iter().take(8000).any(|b| *b == 0) {
            continue; // binary
        }
        let text = String::from_utf8_lossy(&bytes);
        for (n, line) in text.lines().enumerate() {
            for pattern in &forbidden {
                if line.contains(pattern.as_str()) {
                    let rel = path.strip_prefix(root()).unwrap_or(&path);
                    found.push(format!("{}:{}: {pattern}", rel.display(), n + 1));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "a clone has no files outside the repository; describe them in words instead:\n  {}",
        found.join("\n  ")
    );
}

#[test]
fn the_readme_is_short() {
    let lines = read(&root().join("README.md")).lines().count();
    assert!(
        lines <= 250,
        "README.md has {lines} lines; keep it at most 250 and move detail into docs/"
    );
}

/// `text` without its inline code spans (`` `a](b` `` is not a link).
fn without_code_spans(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|c| *c == '`').count();
        let fence = "`".repeat(ticks);
        let after = &rest[start + ticks..];
        match after.find(&fence) {
            Some(end) => rest = &after[end + ticks..],
            None => {
                rest = after;
                out.push_str(&fence);
            }
        }
    }
    out.push_str(rest);
    out
}

/// The targets of inline links `[text](target)` and link definitions `[label]: target`.
fn link_targets(markdown: &str) -> Vec<(usize, String)> {
    let mut targets = Vec::new();
    for (i, line) in outside_code_blocks(markdown) {
        let line = without_code_spans(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            targets.push((i + 1, after[..end].to_owned()));
            rest = &after[end..];
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with('[')
            && let Some((label, target)) = trimmed.split_once("]:")
            && !label.contains("](")
        {
            targets.push((i + 1, target.trim().to_owned()));
        }
    }
    targets
        .into_iter()
        .map(|(line, t)| {
            let t = t.split_whitespace().next().unwrap_or("").to_owned();
            (
                line,
                t.trim_start_matches('<').trim_end_matches('>').to_owned(),
            )
        })
        .collect()
}

/// GitHub's anchors for the headings of `markdown`: lower case, spaces to `-`, punctuation
/// other than `-` and `_` dropped, `-1`, `-2`… for repeats.
fn anchors(markdown: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    headings(markdown)
        .into_iter()
        .map(|(_, _, text)| {
            let base: String = text
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect();
            let n = seen.entry(base.clone()).or_insert(0);
            let anchor = if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            *n += 1;
            anchor
        })
        .collect()
}

#[test]
fn relative_links_in_the_docs_lead_somewhere() {
    let mut pages = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("a readable docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    assert!(!docs.is_empty(), "docs/ has no Markdown files");
    pages.extend(docs);

    let mut broken = Vec::new();
    let mut checked = 0;
    for page in &pages {
        let text = read(page);
        let rel = page
            .strip_prefix(root())
            .unwrap_or(page)
            .display()
            .to_string();
        for (line, target) in link_targets(&text) {
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (path, fragment) = match target.split_once('#') {
                Some((p, f)) => (p, Some(f)),
                None => (target.as_str(), None),
            };
            let file = if path.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap_or(root()).join(path)
            };
            if !file.exists() {
                broken.push(format!("{rel}:{line}: {target}: no such file"));
                continue;
            }
            let is_markdown = file.extension().is_some_and(|e| e == "md");
            if let Some(fragment) = fragment.filter(|_| is_markdown)
                && !anchors(&read(&file)).iter().any(|a| a == fragment)
            {
                broken.push(format!("{rel}:{line}: {target}: no such heading"));
            }
        }
    }
    assert!(
        checked > 0,
        "found no relative links at all: is the link reader broken?"
    );
    assert!(
        broken.is_empty(),
        "broken relative links:\n  {}",
        broken.join("\n  ")
    );
}

#[test]
fn the_link_reader_reads_links_and_anchors() {
    let md = "# A `b` c (d)\n\nSee [x](docs/x.md#y) and `[not](a link)`.\n\n```sh\n[no](link)\n```\n\n[def]: other.md\n\n## A `b` c (d)\n";
    let targets: Vec<String> = link_targets(md).into_iter().map(|(_, t)| t).collect();
    assert_eq!(targets, ["docs/x.md#y", "other.md"]);
    assert_eq!(anchors(md), ["a-b-c-d", "a-b-c-d-1"]);
}
