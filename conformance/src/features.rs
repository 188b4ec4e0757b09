//! Loading the feature files, with Scenario Outlines expanded the way Go's gherkin
//! (godog's parser) does it: `<name>` is replaced only for Examples columns; any other
//! `<...>` text (default_backend.feature's `<key>`/`<value>`) stays literal. cucumber-rs'
//! own expansion rejects such text, so features reach it already expanded.

use std::path::{Path, PathBuf};

use cucumber::gherkin::{self, GherkinEnv};

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("feature directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no *.feature files in {0}")]
    Empty(PathBuf),
    #[error("parsing {path}: {detail}")]
    Parse { path: PathBuf, detail: String },
}

/// Every `*.feature` file of `dir`, in file-name order, parsed and expanded (or just `dir`
/// when it is a single feature file).
pub fn load_dir(dir: &Path) -> Result<Vec<gherkin::Feature>, FeatureError> {
    if dir.is_file() {
        return Ok(vec![load_file(dir)?]);
    }
    let entries = std::fs::read_dir(dir).map_err(|source| FeatureError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "feature") && p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(FeatureError::Empty(dir.to_owned()));
    }
    files.iter().map(|f| load_file(f)).collect()
}

pub fn load_file(path: &Path) -> Result<gherkin::Feature, FeatureError> {
    let feature = gherkin::Feature::parse_path(path, GherkinEnv::default()).map_err(|e| {
        FeatureError::Parse {
            path: path.to_owned(),
            detail: e.to_string(),
        }
    })?;
    Ok(expand_outlines(feature))
}

/// Go gherkin's pickle compilation for outlines: one scenario per Examples body row; an
/// outline without Examples runs once, as a plain scenario.
pub fn expand_outlines(mut feature: gherkin::Feature) -> gherkin::Feature {
    let scenarios = std::mem::take(&mut feature.scenarios);
    feature.scenarios = scenarios.into_iter().flat_map(expand_scenario).collect();
    for rule in &mut feature.rules {
        let scenarios = std::mem::take(&mut rule.scenarios);
        rule.scenarios = scenarios.into_iter().flat_map(expand_scenario).collect();
    }
    feature
}

fn expand_scenario(scenario: gherkin::Scenario) -> Vec<gherkin::Scenario> {
    if scenario.examples.is_empty() {
        return vec![scenario];
    }
    let mut out = Vec::new();
    for example in &scenario.examples {
        let Some(table) = &example.table else {
            continue;
        };
        let Some((header, rows)) = table.rows.split_first() else {
            continue;
        };
        for (i, row) in rows.iter().enumerate() {
            let subst = |s: &str| interpolate(s, header, row);
            let mut sc = scenario.clone();
            sc.name = subst(&sc.name);
            // Report the Examples row as the scenario's line, as cucumber-rs does.
            sc.position = example.position;
            sc.position.line += i + 2;
            sc.tags.extend(example.tags.iter().cloned());
            for step in &mut sc.steps {
                step.value = subst(&step.value);
                if let Some(d) = &mut step.docstring {
                    *d = subst(d);
                }
                if let Some(t) = &mut step.table {
                    for cell in t.rows.iter_mut().flatten() {
                        *cell = subst(cell);
                    }
                }
            }
            let mut ex = example.clone();
            if let Some(t) = &mut ex.table {
                t.rows = vec![header.clone(), row.clone()];
            }
            sc.examples = vec![ex];
            out.push(sc);
        }
    }
    out
}

/// gherkin-go `interpolate`: plain replacement of `<column>` for each Examples column.
fn interpolate(text: &str, header: &[String], row: &[String]) -> String {
    let mut s = text.to_owned();
    for (name, value) in header.iter().zip(row) {
        s = s.replace(&format!("<{name}>"), value);
    }
    s
}

/// The runner's default: the shared, unmodified upstream files next to the repository.
pub const DEFAULT_FEATURES: &str = "../shared/conformance/ingress";

/// Resolves a feature directory: as given if it exists (absolute, or relative to the current
/// directory), else relative to the enclosing workspace root (found from the current
/// directory), else relative to this crate's workspace at build time.
pub fn resolve_dir(p: &Path) -> PathBuf {
    if p.is_absolute() || p.exists() {
        return std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
    }
    let mut candidates = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        for dir in cwd.ancestors() {
            let manifest = dir.join("Cargo.toml");
            if std::fs::read_to_string(&manifest).is_ok_and(|m| m.contains("[workspace]")) {
                candidates.push(dir.join(p));
                break;
            }
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p));
    // The shared data directory may also be named explicitly, or sit at the
    // workplace's fixed location when the checkout lives elsewhere.
    if let Ok(rest) = p.strip_prefix("../shared") {
        if let Some(dir) = std::env::var_os("MEMBRANE_SHARED_DIR") {
            candidates.push(Path::new(&dir).join(rest));
        }
        candidates.push(Path::new("/work/shared").join(rest));
    }
    candidates
        .into_iter()
        .find(|c| c.is_dir())
        .and_then(|c| std::fs::canonicalize(c).ok())
        .unwrap_or_else(|| p.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTLINE: &str = r#"Feature: F
  Scenario Outline: send <method> to <host>
    When I send a "<method>" request to http://"<host>"/"<path>"
    And the response headers must contain <key> with matching <value>
      | key  | value    |
      | Date | <method> |

    Examples:
      | method | host    | path |
      | GET    | my-host |      |
      | PUT    |         | r    |

  Scenario Outline: no examples
    When I send 100 requests to "http://load-balancing"
"#;

    #[test]
    fn outlines_expand_like_go_gherkin() {
        let f = gherkin::Feature::parse(OUTLINE, GherkinEnv::default()).unwrap();
        let f = expand_outlines(f);
        assert_eq!(f.scenarios.len(), 3);
        let s0 = &f.scenarios[0];
        assert_eq!(s0.name, "send GET to my-host");
        assert_eq!(
            s0.steps[0].value,
            r#"I send a "GET" request to http://"my-host"/"""#
        );
        // Not an Examples column: left as text so the upstream step regex matches.
        assert_eq!(
            s0.steps[1].value,
            "the response headers must contain <key> with matching <value>"
        );
        let t = &s0.steps[1].table.as_ref().unwrap().rows;
        assert_eq!(t[1], vec!["Date".to_string(), "GET".to_string()]);
        assert_eq!(
            f.scenarios[1].steps[0].value,
            r#"I send a "PUT" request to http://""/"r""#
        );
        assert_eq!(f.scenarios[2].name, "no examples");
        assert_eq!(f.scenarios[2].steps.len(), 1);
    }

    #[test]
    fn shared_feature_files_give_30_scenarios() {
        let dir = resolve_dir(Path::new(DEFAULT_FEATURES));
        if !dir.is_dir() {
            // The shared data lives next to the repository, not in it.
            eprintln!("skipping: {} not present", dir.display());
            return;
        }
        let features = load_dir(&dir).unwrap();
        assert_eq!(features.len(), 5);
        let count: usize = features.iter().map(|f| f.scenarios.len()).sum();
        assert_eq!(count, 30);
        let db = features
            .iter()
            .find(|f| f.name == "Default backend")
            .unwrap();
        assert_eq!(db.scenarios.len(), 6);
        assert!(db.background.is_some());
    }

    #[test]
    fn missing_dir_and_empty_dir_are_errors() {
        assert!(matches!(
            load_dir(Path::new("/nonexistent-features")),
            Err(FeatureError::Dir { .. })
        ));
        let d = tempfile::tempdir().unwrap();
        assert!(matches!(load_dir(d.path()), Err(FeatureError::Empty(_))));
        std::fs::write(
            d.path().join("bad.feature"),
            "Feature: x\n  Scenario: y\n    Given a\n      \"\"\"\n      unterminated\n",
        )
        .unwrap();
        assert!(matches!(
            load_dir(d.path()),
            Err(FeatureError::Parse { .. })
        ));
    }
}
