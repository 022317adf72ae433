//! The image and its front door, from docker/'s files (no Docker engine runs
//! here).
//!
//! What docker/Dockerfile's build stage copies from the build context of
//! docker/compose.yaml is laid out in a temporary directory, where `cargo
//! fetch` and `cargo metadata` (`--locked --offline`) must accept it; every
//! file the crate reads at compile time outside `src/` (the `sqlx::migrate!`
//! directory, `include_str!` and the like) must be in it. The runtime stage
//! runs as a non-root user, ships the migrations and has a health check, which
//! is built as the Dockerfile builds it and run against a serving instance.
//!
//! nginx: the public port answers 404 for `/metrics` and `/v1/admin`; the
//! operator port serves only those, and, like every port but the public one,
//! is published on 127.0.0.1 only.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::deploy::{docker, port_mapping, yaml};
use crate::helpers::TestApp;

/// The repository root.
fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// docker/Dockerfile and the build context docker/compose.yaml builds it from:
/// every service that builds the image names the same context and Dockerfile,
/// and that Dockerfile is docker/Dockerfile.
fn image_build() -> (String, PathBuf) {
    let compose = yaml("compose.yaml");
    let mut builds = HashSet::new();
    for (name, service) in compose["services"].as_mapping().expect("services") {
        let build = &service["build"];
        if build.is_null() {
            continue;
        }
        let (context, dockerfile) = match build.as_str() {
            Some(context) => (context, "Dockerfile"),
            None => (
                build["context"].as_str().unwrap_or("."),
                build["dockerfile"].as_str().unwrap_or("Dockerfile"),
            ),
        };
        // Relative to the compose file's directory.
        let context = repo()
            .join("docker")
            .join(context)
            .canonicalize()
            .unwrap_or_else(|e| panic!("{name:?}: build context {context}: {e}"));
        let dockerfile = context.join(dockerfile);
        builds.insert((context, dockerfile));
    }
    assert_eq!(
        builds.len(),
        1,
        "the services build from different contexts or Dockerfiles: {builds:?}"
    );
    let (context, dockerfile) = builds.into_iter().next().expect("one build");
    assert_eq!(
        dockerfile.canonicalize().ok(),
        repo().join("docker/Dockerfile").canonicalize().ok(),
        "docker/compose.yaml builds {}",
        dockerfile.display()
    );
    (docker("Dockerfile"), context)
}

/// One stage of a Dockerfile: its name (`AS ...`) and its instructions, each a
/// keyword in upper case and its arguments (continuation lines joined,
/// comments left out).
#[derive(Debug)]
struct Stage {
    name: Option<String>,
    instructions: Vec<(String, String)>,
}

fn stages(dockerfile: &str) -> Vec<Stage> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in dockerfile.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    let mut out: Vec<Stage> = Vec::new();
    for line in &lines {
        let (keyword, args) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let keyword = keyword.to_ascii_uppercase();
        if keyword == "FROM" {
            let words: Vec<&str> = args
                .split_whitespace()
                .filter(|w| !w.starts_with("--"))
                .collect();
            let name = match words.as_slice() {
                [_, kw, name] if kw.eq_ignore_ascii_case("as") => Some((*name).to_owned()),
                _ => None,
            };
            out.push(Stage {
                name,
                instructions: Vec::new(),
            });
        } else if let Some(stage) = out.last_mut() {
            stage.instructions.push((keyword, args.trim().to_owned()));
        }
    }
    out
}

/// The words of an instruction: its JSON array (exec form), or its words.
fn words(args: &str) -> Vec<String> {
    if args.trim_start().starts_with('[') {
        serde_json::from_str(args).unwrap_or_else(|e| panic!("{args}: {e}"))
    } else {
        args.split_whitespace().map(str::to_owned).collect()
    }
}

/// A COPY (or ADD): the stage it copies from (`None`: the build context), its
/// sources and its destination.
#[derive(Debug)]
struct CopyOp {
    from: Option<String>,
    sources: Vec<String>,
    dest: String,
}

fn copy_op(args: &str) -> CopyOp {
    let mut from = None;
    let mut rest = args.trim();
    while let Some(flagged) = rest.strip_prefix("--") {
        let (flag, more) = flagged
            .split_once(char::is_whitespace)
            .unwrap_or((flagged, ""));
        match flag.split_once('=') {
            Some(("from", stage)) => from = Some(stage.to_owned()),
            Some(("chown" | "chmod" | "link", _)) => {}
            None if flag == "link" => {}
            _ => panic!("COPY --{flag}: a flag this test does not model"),
        }
        rest = more.trim_start();
    }
    let mut sources = words(rest);
    let dest = sources
        .pop()
        .unwrap_or_else(|| panic!("COPY {args}: no destination"));
    assert!(!sources.is_empty(), "COPY {args}: no source");
    CopyOp {
        from,
        sources,
        dest,
    }
}

/// A path of a stage's filesystem, absolute, `.` and `..` resolved: `path`
/// taken from the directory `dir` unless absolute.
fn in_stage(dir: &str, path: &str) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{dir}/{path}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Where a COPY of one source puts it, given the stage's WORKDIR.
fn copy_target(op: &CopyOp, workdir: &str, source: &str) -> String {
    let dest = in_stage(workdir, &op.dest);
    if op.dest.ends_with('/') || op.sources.len() > 1 {
        let name = source
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(source);
        in_stage(&dest, name)
    } else {
        dest
    }
}

/// The value of `--flag value` or `--flag=value`.
fn flag_value(words: &[String], flag: &str) -> Option<String> {
    words.iter().enumerate().find_map(|(i, w)| {
        if w == flag {
            words.get(i + 1).cloned()
        } else {
            w.strip_prefix(flag)
                .and_then(|rest| rest.strip_prefix('='))
                .map(str::to_owned)
        }
    })
}

/// A temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let dir = std::env::temp_dir().join(crate::helpers::unique(&format!("chatshard-{what}")));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    if from.is_dir() {
        std::fs::create_dir_all(to)?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else {
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(from, to)?;
    }
    Ok(())
}

/// The stage of a Dockerfile that runs `cargo build`, laid out in a temporary
/// directory (its `/`) from the build context exactly as its COPY
/// instructions lay it out.
struct BuildStage {
    root: TempDir,
    /// As `COPY --from=` names it.
    name: String,
    /// Each RUN: the WORKDIR it runs in and its words.
    runs: Vec<(String, Vec<String>)>,
}

impl BuildStage {
    fn path(&self, in_stage: &str) -> PathBuf {
        self.root.0.join(in_stage.trim_start_matches('/'))
    }

    /// A file of the layout as a path of the stage.
    fn in_stage(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.root.0).unwrap_or(path);
        in_stage("/", &rel.to_string_lossy())
    }

    /// The RUNs of `program` (`cargo`, `rustc`).
    fn runs_of<'a>(&'a self, program: &'a str) -> impl Iterator<Item = &'a (String, Vec<String>)> {
        self.runs
            .iter()
            .filter(move |(_, words)| words.first().map(String::as_str) == Some(program))
    }

    /// The WORKDIR and the words of `RUN cargo build`.
    fn cargo_build(&self) -> (String, Vec<String>) {
        let mut builds = self
            .runs_of("cargo")
            .filter(|(_, words)| words.get(1).map(String::as_str) == Some("build"));
        let build = builds.next().cloned().expect("RUN cargo build");
        assert!(builds.next().is_none(), "more than one RUN cargo build");
        build
    }

    /// What the stage's `rustc` runs write (`-o`), as paths of the stage.
    fn rustc_outputs(&self) -> Vec<String> {
        self.runs_of("rustc")
            .filter_map(|(workdir, words)| {
                flag_value(words, "-o").map(|out| in_stage(workdir, &out))
            })
            .collect()
    }
}

/// Lays out the stage of `dockerfile` that runs `cargo build` from `context`;
/// fails on a COPY source the context lacks.
fn lay_out_build_stage(dockerfile: &str, context: &Path) -> Result<BuildStage, String> {
    let all = stages(dockerfile);
    let (index, stage) = all
        .iter()
        .enumerate()
        .find(|(_, s)| {
            s.instructions
                .iter()
                .any(|(k, a)| k == "RUN" && a.starts_with("cargo build"))
        })
        .ok_or("no stage of docker/Dockerfile runs `cargo build`")?;
    let root = TempDir::new("image-build");
    let mut workdir = "/".to_owned();
    let mut runs = Vec::new();
    for (keyword, args) in &stage.instructions {
        match keyword.as_str() {
            "WORKDIR" => workdir = in_stage(&workdir, args),
            "RUN" => runs.push((workdir.clone(), words(args))),
            "COPY" | "ADD" => {
                let op = copy_op(args);
                if op.from.is_some() {
                    continue;
                }
                for source in &op.sources {
                    assert!(
                        !source.contains(['*', '?', '[']) && !source.contains("://"),
                        "{keyword} {args}: globs and URLs are not modelled"
                    );
                    if Path::new(source)
                        .components()
                        .any(|c| matches!(c, std::path::Component::ParentDir))
                    {
                        return Err(format!(
                            "docker/Dockerfile: `{keyword} {args}`: {source} is outside the build context"
                        ));
                    }
                    let from = context.join(source);
                    if !from.exists() {
                        return Err(format!(
                            "docker/Dockerfile: `{keyword} {args}`: the build context ({}) has no {source}",
                            context.display()
                        ));
                    }
                    // A directory's contents go into the destination; a file
                    // goes to it, or into it when it is a directory.
                    let to = if from.is_dir() {
                        in_stage(&workdir, &op.dest)
                    } else {
                        copy_target(&op, &workdir, source)
                    };
                    copy_tree(&from, &root.0.join(to.trim_start_matches('/')))
                        .map_err(|e| format!("copying {source}: {e}"))?;
                }
            }
            _ => {}
        }
    }
    Ok(BuildStage {
        root,
        name: stage.name.clone().unwrap_or_else(|| index.to_string()),
        runs,
    })
}

/// Where the stage runs `cargo build`, cargo reads the manifest, the lockfile
/// and every target from what the stage holds, offline, or fails; the package
/// as `cargo metadata --locked --offline` gives it. Nothing is written to the
/// repository's target directory.
fn cargo_metadata(stage: &BuildStage) -> Result<Value, String> {
    let (workdir, _) = stage.cargo_build();
    // The image is built on Linux (glibc) for the Docker host's architecture.
    // Without a platform, cargo wants the crates of every platform (Windows,
    // macOS...), which an offline machine need not have.
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let cargo = |args: &[&str]| {
        let out = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(stage.path(&workdir))
            .env("CARGO_TARGET_DIR", stage.path("/tmp/cargo-target"))
            .output()
            .map_err(|e| format!("{}: {e}", env!("CARGO")))?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(format!(
                "cargo {}, in the build stage's {workdir} as docker/Dockerfile lays it out:\n{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    // `cargo metadata` leaves out a target whose file is missing (a bench
    // without benches/) where `cargo build` fails on the manifest; `cargo
    // fetch` reads the manifest as `cargo build` does, and needs every crate
    // of the lockfile for the platform at hand.
    cargo(&["fetch", "--locked", "--offline", "--target", &platform])?;
    let metadata = cargo(&[
        "metadata",
        "--locked",
        "--offline",
        "--format-version",
        "1",
        "--filter-platform",
        &platform,
    ])?;
    serde_json::from_slice(&metadata).map_err(|e| format!("cargo metadata: {e}"))
}

/// The argument of a macro that names a path.
#[derive(Debug, PartialEq)]
enum MacroArg {
    /// A string literal, unescaped.
    Literal(String),
    /// Nothing: `migrate!()` reads `./migrations`.
    Empty,
    /// Anything else (`concat!(env!("OUT_DIR"), ...)`).
    Expression,
}

/// A call of `include_str!`, `include_bytes!`, `include!` or `migrate!` in a
/// Rust file.
#[derive(Debug, PartialEq)]
struct PathMacro {
    name: String,
    arg: MacroArg,
    /// In a `#[cfg(test)]` item: `cargo build` (without tests) skips it.
    test_only: bool,
}

/// The path macros of a Rust file, read past comments and literals, each with
/// whether it sits in a `#[cfg(test)]` item.
///
/// The file is taken to be laid out by rustfmt, as the crate's sources are:
/// that is what [`cfg_test_items`] relies on. Block comments are taken not to
/// nest (src/ has none).
fn path_macros(source: &str) -> Vec<PathMacro> {
    // Comments and literals are matched whole, so that what they hold is
    // skipped; a path macro is matched with its first argument.
    static TOKEN: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(
            r#"(?x)
              //[^\n]*
            | /\*(?s:.*?)\*/
            | \bb?r"[^"]*"
            | \bb?r\#"(?s:.*?)"\#
            | \bb?r\#\#"(?s:.*?)"\#\#
            | b?"(?:[^"\\]|\\.)*"
            | '(?:[^'\\\n]|\\[^\n]{1,10}?)'
            | \b(?P<name>include_str|include_bytes|include|migrate)\s*!\s*[(\[{]\s*
              (?: "(?P<literal>(?:[^"\\]|\\.)*)" | r\#*"(?P<raw>[^"]*)"\#* )?
              \s*(?P<end>[)\]},])?
            "#,
        )
        .expect("regex")
    });
    let tests = cfg_test_items(source);
    TOKEN
        .captures_iter(source)
        .filter_map(|c| {
            let name = c.name("name")?;
            let literal = c
                .name("literal")
                .map(|l| unescape(l.as_str()))
                .or_else(|| c.name("raw").map(|r| r.as_str().to_owned()));
            let arg = match (literal, c.name("end")) {
                (Some(literal), Some(_)) => MacroArg::Literal(literal),
                (None, Some(_)) => MacroArg::Empty,
                (_, None) => MacroArg::Expression,
            };
            Some(PathMacro {
                name: name.as_str().to_owned(),
                arg,
                test_only: tests.iter().any(|item| item.contains(&name.start())),
            })
        })
        .collect()
}

/// The text of a string literal's body.
fn unescape(body: &str) -> String {
    let mut out = String::new();
    let mut chars = body.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// The byte ranges of the `#[cfg(test)]` items of rustfmt-formatted
/// `source` (all of it after `#![cfg(test)]`): from the attribute to the end
/// of the item's first line when it ends it (`mod tests;`, a field, a
/// one-line item), else to the `}` that closes it at the attribute's
/// indentation.
fn cfg_test_items(source: &str) -> Vec<std::ops::Range<usize>> {
    let mut lines = Vec::new();
    let mut at = 0;
    for line in source.split_inclusive('\n') {
        lines.push((at, line.trim_end()));
        at += line.len();
    }
    let indent = |line: &str| line.len() - line.trim_start().len();
    let mut items = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let (start, line) = lines[i];
        match line.trim() {
            "#![cfg(test)]" => return std::iter::once(0..source.len()).collect(),
            "#[cfg(test)]" => {
                let column = indent(line);
                // The item's first line, past its other attributes.
                let mut j = i + 1;
                while j < lines.len() && lines[j].1.trim_start().starts_with("#[") {
                    j += 1;
                }
                let whole = |l: &str| l.ends_with([';', ',', '}']);
                let mut end = j;
                if j < lines.len() && !whole(lines[j].1) {
                    end = j + 1;
                    while end < lines.len()
                        && !(indent(lines[end].1) == column
                            && lines[end].1.trim_start().starts_with('}'))
                    {
                        end += 1;
                    }
                }
                let (last, text) = lines[end.min(lines.len() - 1)];
                items.push(start..last + text.len());
                i = end + 1;
            }
            _ => i += 1,
        }
    }
    items
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every file the crate reads at compile time outside its sources must be in
/// the stage: the directory of each `migrate!` (relative to the manifest's
/// directory, `manifest_dir`, a path of the stage), and the file of each
/// `include_str!`, `include_bytes!` and `include!` (relative to the file that
/// includes it). Calls in `#[cfg(test)]` items are left out: the image's
/// `cargo build` does not compile them. Returns the `migrate!` directories, as
/// paths of the stage.
fn compile_time_files(stage: &BuildStage, manifest_dir: &str) -> Result<Vec<String>, String> {
    let mut files = Vec::new();
    rust_files(&stage.path(&in_stage(manifest_dir, "src")), &mut files);
    let mut migrations = Vec::new();
    let mut missing = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let name = stage.in_stage(file);
        for call in path_macros(&text) {
            if call.test_only {
                continue;
            }
            let literal = match call.arg {
                MacroArg::Literal(path) => path,
                MacroArg::Empty if call.name == "migrate" => "./migrations".to_owned(),
                other => {
                    return Err(format!(
                        "{name}: {}!({other:?}) names no literal path, which this test cannot follow",
                        call.name
                    ));
                }
            };
            if call.name == "migrate" {
                let dir = in_stage(manifest_dir, &literal);
                let has_sql = std::fs::read_dir(stage.path(&dir)).is_ok_and(|entries| {
                    entries
                        .filter_map(Result::ok)
                        .any(|e| e.path().extension().is_some_and(|x| x == "sql"))
                });
                if !has_sql {
                    missing.push(format!(
                        "{dir}, no .sql in it ({name}: migrate!({literal:?}))"
                    ));
                }
                migrations.push(dir);
            } else {
                let parent = name.rsplit_once('/').map_or("/", |(dir, _)| dir);
                let target = in_stage(parent, &literal);
                if !stage.path(&target).is_file() {
                    missing.push(format!("{target} ({name}: {}!({literal:?}))", call.name));
                }
            }
        }
    }
    if missing.is_empty() {
        Ok(migrations)
    } else {
        Err(format!(
            "the build stage lacks what the crate reads at compile time:\n{}",
            missing.join("\n")
        ))
    }
}

/// Where the runtime image keeps the migrations, for reading.
const MIGRATIONS_DIR: &str = "/usr/share/chatshard/migrations";

/// The command of a HEALTHCHECK (`None`: `NONE`, or no command).
fn health_command(args: &str) -> Option<Vec<String>> {
    let mut rest = args.trim();
    while rest.starts_with("--") {
        rest = rest
            .split_once(char::is_whitespace)
            .map_or("", |(_, more)| more.trim_start());
    }
    let (keyword, command) = rest.split_once(char::is_whitespace)?;
    keyword
        .eq_ignore_ascii_case("CMD")
        .then(|| words(command))
        .filter(|w| !w.is_empty())
}

/// What is wrong with the image's last stage, the one that runs: it must run
/// as a non-root user, run the service binary the build stage compiles
/// (`binary`), have a health check whose program the build stage compiles
/// (`compiled`), and ship the migrations the binary embeds (`migrations`) in
/// [`MIGRATIONS_DIR`]. `build` names the build stage.
fn runtime_problems(
    dockerfile: &str,
    build: &str,
    binary: &str,
    compiled: &[String],
    migrations: &[String],
) -> Vec<String> {
    let all = stages(dockerfile);
    let mut problems = Vec::new();
    let Some(runtime) = all.last() else {
        return vec!["no stage".to_owned()];
    };
    if all.len() < 2 {
        problems.push("one stage: the image would carry the toolchain".to_owned());
    }
    let last = |keyword: &str| {
        runtime
            .instructions
            .iter()
            .rev()
            .find(|(k, _)| k == keyword)
            .map(|(_, args)| args.as_str())
    };
    // What the stage copies from the build stage: (source, where it lands).
    let mut workdir = "/".to_owned();
    let mut from_build = Vec::new();
    for (keyword, args) in &runtime.instructions {
        match keyword.as_str() {
            "WORKDIR" => workdir = in_stage(&workdir, args),
            "COPY" => {
                let op = copy_op(args);
                if op.from.as_deref() == Some(build) {
                    for source in &op.sources {
                        from_build
                            .push((in_stage("/", source), copy_target(&op, &workdir, source)));
                    }
                }
            }
            _ => {}
        }
    }
    let installed = |program: &str, wanted: &[String]| {
        from_build
            .iter()
            .any(|(source, target)| target == program && wanted.contains(source))
    };
    match last("USER").map(|u| u.split(':').next().unwrap_or("")) {
        None => problems.push("no USER: the image runs as root".to_owned()),
        Some("root" | "0") => problems.push("USER is root".to_owned()),
        Some(_) => {}
    }
    match last("ENTRYPOINT").map(words) {
        Some(entry) if entry.first().is_some_and(|p| installed(p, &[binary.to_owned()])) => {}
        entry => problems.push(format!(
            "the ENTRYPOINT ({entry:?}) is not the binary `cargo build` makes ({binary}), copied from the build stage"
        )),
    }
    match last("HEALTHCHECK").map(health_command) {
        None => problems.push("no HEALTHCHECK".to_owned()),
        Some(None) => problems.push("HEALTHCHECK without a command".to_owned()),
        Some(Some(command)) if installed(&command[0], compiled) => {}
        Some(Some(command)) => problems.push(format!(
            "the HEALTHCHECK runs {}, which is no program of the build stage ({compiled:?}) copied there",
            command[0]
        )),
    }
    let shipped = from_build.iter().any(|(source, target)| {
        target.trim_end_matches('/') == MIGRATIONS_DIR && migrations.contains(source)
    });
    if !shipped {
        problems.push(format!(
            "{MIGRATIONS_DIR} does not hold the migrations the binary embeds ({migrations:?})"
        ));
    }
    problems
}

/// The image builds from exactly what docker/Dockerfile copies out of the build
/// context of docker/compose.yaml: cargo accepts the manifest, the lockfile and
/// every target there, offline; every file the crate reads at compile time is
/// there; and the image that runs is non-root, has a health check and ships the
/// migrations.
#[test]
fn the_image_builds_from_exactly_what_the_dockerfile_copies() {
    let (dockerfile, context) = image_build();
    let stage = lay_out_build_stage(&dockerfile, &context).unwrap_or_else(|e| panic!("{e}"));
    let (workdir, cargo_build) = stage.cargo_build();
    assert!(
        cargo_build.iter().any(|w| w == "--locked"),
        "cargo build without --locked: {cargo_build:?}"
    );
    let metadata = cargo_metadata(&stage).unwrap_or_else(|e| panic!("{e}"));
    let members = metadata["workspace_members"].as_array().expect("members");
    assert_eq!(members.len(), 1, "{members:?}");
    let package = metadata["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .find(|p| p["id"] == members[0])
        .expect("the package");
    // cargo reads every target's file, even of those it does not build.
    let root = stage.root.0.canonicalize().expect("the layout");
    let mut bins = Vec::new();
    for target in package["targets"].as_array().expect("targets") {
        let file = Path::new(target["src_path"].as_str().expect("src_path"));
        assert!(
            file.canonicalize()
                .is_ok_and(|f| f.starts_with(&root) && f.is_file()),
            "target {} is {}, which the build stage lacks",
            target["name"],
            file.display()
        );
        if target["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|k| k == "bin"))
        {
            bins.push(target["name"].as_str().expect("name").to_owned());
        }
    }
    let bin = flag_value(&cargo_build, "--bin").expect("cargo build --bin");
    assert!(bins.contains(&bin), "--bin {bin}: the bins are {bins:?}");
    let migrations = compile_time_files(&stage, &workdir).unwrap_or_else(|e| panic!("{e}"));
    assert!(!migrations.is_empty(), "no sqlx::migrate! in src/");
    let binary = in_stage(&workdir, &format!("target/release/{bin}"));
    let problems = runtime_problems(
        &dockerfile,
        &stage.name,
        &binary,
        &stage.rustc_outputs(),
        &migrations,
    );
    assert!(problems.is_empty(), "docker/Dockerfile: {problems:#?}");
}

/// The check above fails on a COPY of something the context lacks, on a COPY
/// left out that cargo needs, and on a runtime stage that runs as root without
/// a health check or migrations.
#[test]
fn the_image_check_fails_on_what_the_build_would_fail_on() {
    let (dockerfile, context) = image_build();
    let with_vendor = dockerfile.replacen("COPY src ", "COPY vendor ./vendor\nCOPY src ", 1);
    assert_ne!(with_vendor, dockerfile);
    let err = lay_out_build_stage(&with_vendor, &context)
        .err()
        .expect("vendor/ is not in the context");
    assert!(err.contains("has no vendor"), "{err}");

    let without_benches: String = dockerfile
        .lines()
        .filter(|l| !l.starts_with("COPY benches"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(without_benches, dockerfile);
    let stage = lay_out_build_stage(&without_benches, &context).unwrap_or_else(|e| panic!("{e}"));
    let err = cargo_metadata(&stage).expect_err("Cargo.toml declares benches in benches/");
    assert!(
        ["write_path", "auth"]
            .iter()
            .any(|b| err.contains(&format!("`{b}` bench"))),
        "{err}"
    );

    // The runtime stage: a good one, then one that runs as root, checks its
    // health with no program the build stage compiles, and ships other files
    // than the migrations.
    let good = r#"
FROM rust AS build
WORKDIR /src
RUN rustc -o /src/check check.rs
RUN cargo build --release --bin chatshard
FROM debian
COPY --from=build /src/target/release/chatshard /usr/local/bin/
COPY --from=build /src/check /usr/local/bin/check
COPY --from=build /src/migrations /usr/share/chatshard/migrations
USER 10001
HEALTHCHECK --interval=5s CMD ["/usr/local/bin/check"]
ENTRYPOINT ["/usr/local/bin/chatshard"]
"#;
    let runtime = |dockerfile: &str| {
        runtime_problems(
            dockerfile,
            "build",
            "/src/target/release/chatshard",
            &["/src/check".to_owned()],
            &["/src/migrations".to_owned()],
        )
    };
    assert_eq!(runtime(good), Vec::<String>::new());
    let bad = good
        .replace("USER 10001", "USER root")
        .replace(
            "COPY --from=build /src/check",
            "COPY --from=build /src/other",
        )
        .replace("/src/migrations /usr", "/src/sql /usr");
    assert_eq!(runtime(&bad).len(), 3, "{:#?}", runtime(&bad));
}

#[test]
fn path_macros_are_read_as_rustc_reads_them() {
    let source = r##"
        //! include_str!("commented.md")
        #![doc = include_str!("../README.md")]
        pub static M: Migrator = sqlx::migrate!("./migrations");
        static DEFAULT: Migrator = migrate!();
        const S: &str = "include_str!(\"in-a-string\")";
        const R: &str = r#"include_bytes!("in-a-raw-string")"#;
        fn f<'a>(x: &'a str) -> char { let _ = x; '"' }
        /* include!("in a comment") */
        struct Fields {
            #[cfg(test)]
            only_in_tests: u8,
            always: u8,
        }
        const BYTES: &[u8] = include_bytes!(r"data.bin");
        const GENERATED: &str = include_str!(concat!(env!("OUT_DIR"), "/x"));
        #[cfg(test)]
        mod tests {
            fn g() { let _ = include_str!("../../docs/api.md"); }
        }
        #[cfg(test)]
        #[allow(dead_code)]
        fn helper(
            x: u8,
        ) -> &'static str {
            include_str!("helper.txt")
        }
        #[cfg(test)]
        fn one_line() {}
        const AFTER: &str = include_str!("after.txt");
    "##;
    let found: Vec<(String, MacroArg, bool)> = path_macros(source)
        .into_iter()
        .map(|m| (m.name, m.arg, m.test_only))
        .collect();
    let lit = |s: &str| MacroArg::Literal(s.to_owned());
    assert_eq!(
        found,
        [
            ("include_str".to_owned(), lit("../README.md"), false),
            ("migrate".to_owned(), lit("./migrations"), false),
            ("migrate".to_owned(), MacroArg::Empty, false),
            ("include_bytes".to_owned(), lit("data.bin"), false),
            ("include_str".to_owned(), MacroArg::Expression, false),
            ("include_str".to_owned(), lit("../../docs/api.md"), true),
            ("include_str".to_owned(), lit("helper.txt"), true),
            ("include_str".to_owned(), lit("after.txt"), false),
        ]
    );
    // A file that is all tests.
    let tests_only = path_macros("#![cfg(test)]\nconst X: &str = include_str!(\"x\");");
    assert!(tests_only[0].test_only);
}

fn rustc() -> PathBuf {
    if let Some(rustc) = std::env::var_os("RUSTC") {
        return rustc.into();
    }
    let sibling =
        Path::new(env!("CARGO")).with_file_name(format!("rustc{}", std::env::consts::EXE_SUFFIX));
    if sibling.is_file() {
        sibling
    } else {
        PathBuf::from("rustc")
    }
}

/// The image's health check, built as the Dockerfile builds it, probes the
/// listener of docker/chatshard.toml, and passes on a serving chatshard only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_health_check_passes_on_a_serving_instance_only() {
    let (dockerfile, context) = image_build();
    let stage = lay_out_build_stage(&dockerfile, &context).unwrap_or_else(|e| panic!("{e}"));
    let runtime = stages(&dockerfile).pop().expect("a stage");
    let command = runtime
        .instructions
        .iter()
        .rev()
        .find(|(k, _)| k == "HEALTHCHECK")
        .and_then(|(_, args)| health_command(args))
        .expect("a HEALTHCHECK command");
    let [program, address, path] = command.as_slice() else {
        panic!("HEALTHCHECK CMD [program, address, path], not {command:?}");
    };
    // The program the runtime stage puts there, from the `rustc` that makes it.
    let source = runtime
        .instructions
        .iter()
        .filter(|(k, _)| k == "COPY")
        .map(|(_, args)| copy_op(args))
        .find(|op| op.from.as_deref() == Some(stage.name.as_str()) && op.dest == *program)
        .map(|op| in_stage("/", &op.sources[0]))
        .expect("a COPY of the health check");
    let (workdir, rustc_run) = stage
        .runs_of("rustc")
        .find(|(workdir, words)| {
            flag_value(words, "-o").is_some_and(|out| in_stage(workdir, &out) == source)
        })
        .cloned()
        .expect("the RUN rustc that builds the health check");
    let out = TempDir::new("healthcheck");
    let binary = out.0.join("chatshard-healthcheck");
    let mut args = rustc_run[1..].to_vec();
    let o = args.iter().position(|a| a == "-o").expect("-o");
    args[o + 1] = binary.to_string_lossy().into_owned();
    let built = Command::new(rustc())
        .args(&args)
        .current_dir(stage.path(&workdir))
        .output()
        .expect("rustc");
    assert!(
        built.status.success(),
        "rustc {args:?}:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );

    // It probes the listener docker/chatshard.toml configures, on loopback.
    let settings = chatshard::config::Settings::from_toml(&docker("chatshard.toml"), [])
        .expect("docker/chatshard.toml");
    let probed: std::net::SocketAddr = address.parse().expect("HEALTHCHECK address");
    assert!(probed.ip().is_loopback(), "{probed}");
    assert_eq!(probed.port(), settings.listen.port());

    let check = |address: String, path: String| {
        let binary = binary.clone();
        tokio::task::spawn_blocking(move || {
            Command::new(binary)
                .args([address, path])
                .output()
                .expect("run the health check")
        })
    };
    let app = TestApp::spawn().await;
    let serving = app.base.trim_start_matches("http://").to_owned();
    let healthy = check(serving.clone(), path.clone()).await.expect("join");
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let not_found = check(serving, "/no-such-route".to_owned())
        .await
        .expect("join");
    assert_eq!(not_found.status.code(), Some(1), "a 404 is not healthy");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let refused = check(closed.to_string(), path.clone()).await.expect("join");
    assert_eq!(refused.status.code(), Some(1), "nothing listens: unhealthy");
    app.shut_down().await;
}

// nginx (docker/nginx.conf).

/// A directive of an nginx configuration: its name, its arguments, its block.
#[derive(Debug)]
struct Directive {
    name: String,
    args: Vec<String>,
    block: Vec<Directive>,
}

enum Token {
    Word(String),
    Open,
    Close,
    End,
}

fn nginx_conf(text: &str) -> Vec<Directive> {
    let c: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < c.len() {
        match c[i] {
            '#' => {
                while i < c.len() && c[i] != '\n' {
                    i += 1;
                }
            }
            ch if ch.is_whitespace() => i += 1,
            '{' => {
                tokens.push(Token::Open);
                i += 1;
            }
            '}' => {
                tokens.push(Token::Close);
                i += 1;
            }
            ';' => {
                tokens.push(Token::End);
                i += 1;
            }
            quote @ ('"' | '\'') => {
                let start = i + 1;
                i += 1;
                while i < c.len() && c[i] != quote {
                    i += if c[i] == '\\' { 2 } else { 1 };
                }
                tokens.push(Token::Word(c[start..i.min(c.len())].iter().collect()));
                i += 1;
            }
            _ => {
                let start = i;
                while i < c.len() && !c[i].is_whitespace() && !matches!(c[i], '{' | '}' | ';') {
                    i += 1;
                }
                tokens.push(Token::Word(c[start..i].iter().collect()));
            }
        }
    }
    fn block(tokens: &[Token], i: &mut usize) -> Vec<Directive> {
        let mut out = Vec::new();
        let mut words = Vec::new();
        while *i < tokens.len() {
            *i += 1;
            match &tokens[*i - 1] {
                Token::Word(w) => words.push(w.clone()),
                Token::Close => break,
                end @ (Token::End | Token::Open) => {
                    let inner = if matches!(end, Token::Open) {
                        block(tokens, i)
                    } else {
                        Vec::new()
                    };
                    let mut parts = std::mem::take(&mut words).into_iter();
                    let name = parts.next().expect("a directive's name");
                    out.push(Directive {
                        name,
                        args: parts.collect(),
                        block: inner,
                    });
                }
            }
        }
        out
    }
    block(&tokens, &mut 0)
}

/// The location of `server` that nginx picks for `path`: an exact match (`=`),
/// else the longest prefix. (docker/nginx.conf has no regular expressions.)
fn location<'a>(server: &'a Directive, path: &str) -> Option<&'a Directive> {
    let locations: Vec<&Directive> = server
        .block
        .iter()
        .filter(|d| d.name == "location")
        .collect();
    for l in &locations {
        assert!(
            !matches!(l.args[0].as_str(), "~" | "~*"),
            "a regular expression location, which this test does not model: {:?}",
            l.args
        );
    }
    if let Some(exact) = locations
        .iter()
        .find(|l| l.args[0] == "=" && l.args.get(1).map(String::as_str) == Some(path))
    {
        return Some(exact);
    }
    locations
        .into_iter()
        .filter(|l| match l.args.as_slice() {
            [prefix] => path.starts_with(prefix.as_str()),
            [modifier, prefix] => modifier == "^~" && path.starts_with(prefix.as_str()),
            _ => false,
        })
        .max_by_key(|l| l.args.last().map_or(0, String::len))
}

/// The public port of nginx answers 404 for `/metrics` and `/v1/admin`, and
/// proxies the API; the operator port proxies only those two and is published
/// on 127.0.0.1 only, like every port but the public one. Prometheus scrapes
/// the replicas, not nginx.
#[test]
fn nginx_keeps_operator_endpoints_off_the_public_port() {
    let conf = nginx_conf(&docker("nginx.conf"));
    let http = conf
        .iter()
        .find(|d| d.name == "http")
        .expect("an http block");
    let servers: Vec<&Directive> = http.block.iter().filter(|d| d.name == "server").collect();
    let server = |port: &str| {
        servers
            .iter()
            .copied()
            .find(|s| {
                s.block
                    .iter()
                    .any(|d| d.name == "listen" && d.args[0].rsplit(':').next() == Some(port))
            })
            .unwrap_or_else(|| panic!("no server listens on {port}"))
    };
    // Proxies to the fleet: chatshard's port, by the service's name.
    let proxied = |server: &Directive, path: &str| {
        location(server, path).is_some_and(|l| {
            let has = |name: &str, args: &[&str]| {
                l.block.iter().any(|d| {
                    d.name == name && d.args.iter().map(String::as_str).eq(args.iter().copied())
                })
            };
            has("set", &["$fleet", "chatshard:8080"]) && has("proxy_pass", &["http://$fleet"])
        })
    };
    // No location is a 404 too.
    let refused = |server: &Directive, path: &str| {
        location(server, path).is_none_or(|l| {
            !l.block.iter().any(|d| d.name == "proxy_pass")
                && l.block
                    .iter()
                    .any(|d| d.name == "return" && matches!(d.args[0].as_str(), "403" | "404"))
        })
    };
    let public = server("8080");
    for path in [
        "/metrics",
        "/metrics/",
        "/v1/admin",
        "/v1/admin/",
        "/v1/admin/config",
        "/v1/admin/moves/shard-0:1",
    ] {
        assert!(refused(public, path), "the public port serves {path}");
    }
    for path in [
        "/v1/chats/c/messages",
        "/healthz",
        "/readyz",
        "/openapi.json",
    ] {
        assert!(
            proxied(public, path),
            "the public port does not serve {path}"
        );
    }
    let operator = server("8081");
    for path in ["/metrics", "/v1/admin/config", "/v1/admin/shards"] {
        assert!(
            proxied(operator, path),
            "the operator port does not serve {path}"
        );
    }
    for path in ["/", "/v1/chats/c/messages", "/openapi.json", "/metricsx"] {
        assert!(refused(operator, path), "the operator port serves {path}");
    }

    let compose = yaml("compose.yaml");
    let lb: Vec<(Option<&str>, &str, &str)> = compose["services"]["lb"]["ports"]
        .as_sequence()
        .expect("lb ports")
        .iter()
        .map(|p| port_mapping(p.as_str().expect("port")))
        .collect();
    assert!(lb.contains(&(None, "8080", "8080")), "{lb:?}");
    let operator_ports: Vec<_> = lb
        .iter()
        .filter(|(_, _, inside)| *inside == "8081")
        .collect();
    assert_eq!(
        operator_ports,
        [&(Some("127.0.0.1"), "8081", "8081")],
        "the operator port is published on loopback only"
    );
    for (name, service) in compose["services"].as_mapping().expect("services") {
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port.as_str().expect("port");
            let (host, _, inside) = port_mapping(port);
            if name.as_str() == Some("lb") && inside == "8080" {
                continue;
            }
            assert_eq!(
                host,
                Some("127.0.0.1"),
                "{name:?} publishes {port} on every interface"
            );
        }
    }
    let prometheus = yaml("prometheus.yml");
    for config in prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
    {
        let mut targets = Vec::new();
        for sd in config["dns_sd_configs"].as_sequence().into_iter().flatten() {
            targets.extend(sd["names"].as_sequence().into_iter().flatten());
        }
        for sc in config["static_configs"].as_sequence().into_iter().flatten() {
            targets.extend(sc["targets"].as_sequence().into_iter().flatten());
        }
        for target in targets {
            let target = target.as_str().expect("target");
            assert!(
                target.split(':').next() != Some("lb"),
                "Prometheus scrapes through nginx: {target}"
            );
        }
    }
}
