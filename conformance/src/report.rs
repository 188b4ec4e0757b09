//! The run's text output and outcome collection: a cucumber [`Writer`] that prints each
//! scenario and step as it finishes, records failures with their reason, and feeds the
//! cucumber JSON writer.

use std::io::Write as _;
use std::sync::{Arc, Mutex};

use cucumber::event::{self, Cucumber, StepError};
use cucumber::gherkin;
use cucumber::{Event, World, Writer, cli, parser, writer};

/// Result of one scenario.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScenarioOutcome {
    pub feature: String,
    /// `file.feature:line`.
    pub location: String,
    pub scenario: String,
    pub passed: bool,
    /// The failing step and why, when `!passed`.
    pub failure: Option<StepFailure>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepFailure {
    /// Keyword and text, e.g. `Then the response status-code must be 200`.
    pub step: String,
    /// `file.feature:line` of the step.
    pub location: String,
    pub reason: String,
}

/// An in-memory sink for cucumber's JSON writer (which panics on I/O errors; the file is
/// written afterwards with proper error handling).
#[derive(Debug, Clone, Default)]
pub struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("report buffer poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where progress lines go.
pub type Out = Box<dyn std::io::Write + Send>;
/// Shared between the reporter (on the runner thread) and the caller's closing lines.
pub type SharedOut = Arc<Mutex<Out>>;

/// Writes one line, best effort: the outcome is in the Summary regardless.
pub fn say(out: &SharedOut, s: &str) {
    if let Ok(mut o) = out.lock() {
        let _ = writeln!(o, "{s}");
        let _ = o.flush();
    }
}

pub struct Reporter {
    out: SharedOut,
    json: Option<writer::Json<SharedBuf>>,
    pub outcomes: Vec<ScenarioOutcome>,
    /// Failures outside scenarios (e.g. a feature that failed to parse).
    pub errors: Vec<String>,
    current: Option<Current>,
}

struct Current {
    outcome: ScenarioOutcome,
    steps_seen: usize,
    all_steps: Vec<gherkin::Step>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("outcomes", &self.outcomes)
            .finish_non_exhaustive()
    }
}

impl Reporter {
    pub fn new(out: SharedOut, json: Option<SharedBuf>) -> Self {
        Reporter {
            out,
            json: json.map(writer::Json::raw),
            outcomes: Vec::new(),
            errors: Vec::new(),
            current: None,
        }
    }

    fn line(&mut self, s: &str) {
        say(&self.out, s);
    }

    fn step_event<W>(&mut self, step: &gherkin::Step, ev: &event::Step<W>) {
        let file = self
            .current
            .as_ref()
            .map(|c| {
                c.outcome
                    .location
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default();
        let text = format!("{}{}", step.keyword, step.value);
        let (mark, reason) = match ev {
            event::Step::Started => return,
            event::Step::Passed(..) => ("✔", None),
            event::Step::Skipped => (
                "?",
                Some("no step definition matches this text (undefined step)".to_owned()),
            ),
            event::Step::Failed(_, _, _, err) => ("✘", Some(step_error(err))),
        };
        self.line(&format!("    {mark} {text}"));
        if let Some(r) = &reason {
            for l in r.lines() {
                self.line(&format!("        {l}"));
            }
        }
        if let Some(cur) = &mut self.current {
            cur.steps_seen += 1;
            if let Some(reason) = reason
                && cur.outcome.failure.is_none()
            {
                cur.outcome.passed = false;
                cur.outcome.failure = Some(StepFailure {
                    step: text,
                    location: format!("{file}:{}", step.position.line),
                    reason,
                });
            }
        }
    }

    fn scenario_event<W>(
        &mut self,
        feature: &gherkin::Feature,
        scenario: &gherkin::Scenario,
        ev: &event::Scenario<W>,
    ) {
        match ev {
            event::Scenario::Started => {
                let mut all_steps: Vec<gherkin::Step> = feature
                    .background
                    .as_ref()
                    .map(|b| b.steps.clone())
                    .unwrap_or_default();
                all_steps.extend(scenario.steps.iter().cloned());
                let location = format!("{}:{}", file_name(feature), scenario.position.line);
                self.line(&format!(
                    "  {}: {}  ({location})",
                    scenario.keyword, scenario.name
                ));
                self.current = Some(Current {
                    outcome: ScenarioOutcome {
                        feature: feature.name.clone(),
                        location,
                        scenario: scenario.name.clone(),
                        passed: true,
                        failure: None,
                    },
                    steps_seen: 0,
                    all_steps,
                });
            }
            event::Scenario::Hook(ty, event::Hook::Failed(_, info)) => {
                let reason = format!("{ty:?} hook failed: {}", panic_text(info));
                self.line(&format!("    ✘ {reason}"));
                if let Some(cur) = &mut self.current
                    && cur.outcome.failure.is_none()
                {
                    cur.outcome.passed = false;
                    cur.outcome.failure = Some(StepFailure {
                        step: format!("{ty:?} hook"),
                        location: cur.outcome.location.clone(),
                        reason,
                    });
                }
            }
            event::Scenario::Background(step, ev) | event::Scenario::Step(step, ev) => {
                self.step_event(step, ev);
            }
            event::Scenario::Finished => {
                let Some(cur) = self.current.take() else {
                    return;
                };
                let not_run: Vec<String> = cur
                    .all_steps
                    .iter()
                    .skip(cur.steps_seen)
                    .map(|s| format!("    - {}{}  (not run)", s.keyword, s.value))
                    .collect();
                for l in not_run {
                    self.line(&l);
                }
                let o = &cur.outcome;
                if o.passed {
                    self.line("  PASSED\n");
                } else if let Some(f) = &o.failure {
                    self.line(&format!(
                        "  FAILED at {}: \"{}\": {}\n",
                        f.location,
                        f.step,
                        first_line(&f.reason)
                    ));
                }
                self.outcomes.push(cur.outcome);
            }
            _ => {}
        }
    }
}

fn file_name(f: &gherkin::Feature) -> String {
    f.path
        .as_ref()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| f.name.clone())
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The text of a step panic: steps fail with a `String` payload (see `steps::fail`).
pub fn panic_text(info: &event::Info) -> String {
    if let Some(s) = info.downcast_ref::<String>() {
        s.clone()
    } else if let Some(s) = info.downcast_ref::<&str>() {
        (*s).to_owned()
    } else {
        "step panicked with a non-string payload".to_owned()
    }
}

fn step_error(e: &StepError) -> String {
    match e {
        StepError::NotFound => "no step definition matches this text".to_owned(),
        StepError::AmbiguousMatch(m) => format!("ambiguous step: {m}"),
        StepError::Panic(info) => panic_text(info),
    }
}

impl<W: World + std::fmt::Debug> Writer<W> for Reporter {
    type Cli = cli::Empty;

    async fn handle_event(&mut self, ev: parser::Result<Event<Cucumber<W>>>, _: &Self::Cli) {
        if let Some(json) = &mut self.json {
            json.handle_event(ev.clone(), &cli::Empty).await;
        }
        match ev {
            Err(e) => {
                let msg = format!("feature error: {e}");
                self.line(&msg);
                self.errors.push(msg);
            }
            Ok(ev) => match &ev.value {
                Cucumber::Feature(f, event::Feature::Started) => {
                    self.line(&format!("{}: {}  ({})", f.keyword, f.name, file_name(f)));
                }
                Cucumber::Feature(f, event::Feature::Scenario(sc, rs)) => {
                    self.scenario_event(f, sc, &rs.event);
                }
                Cucumber::Feature(f, event::Feature::Rule(_, event::Rule::Scenario(sc, rs))) => {
                    self.scenario_event(f, sc, &rs.event);
                }
                _ => {}
            },
        }
    }
}

impl writer::NonTransforming for Reporter {}
