//! The contracts as an integrator meets them: the JSON Schemas in `docs/schemas/` accept the
//! README's example job and event and what the fleet really publishes, refuse the jobs the
//! producer refuses for their shape, and the README's Python example, run exactly as written,
//! exports a segment through the real fleet. (That the schemas are current is a unit test of
//! `contract::schema`.)

use audience_export_core::contract::{Event, ExportJob, ExportStatus};
use audience_export_harness::app::spawn_app;
use audience_export_harness::segment::generate;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const README: &str = include_str!("../../README.md");
const JOB_SCHEMA: &str = include_str!("../../docs/schemas/job.schema.json");
const EVENT_SCHEMA: &str = include_str!("../../docs/schemas/event.schema.json");
/// What precedes the Python example's fenced block in the README.
const PYTHON_MARKER: &str = "<!-- contracts: python-example";

fn validator(schema: &str) -> jsonschema::Validator {
    let schema: Value = serde_json::from_str(schema).expect("a checked-in schema is JSON");
    jsonschema::validator_for(&schema).expect("a checked-in schema is a valid JSON Schema")
}

/// Every error the schema finds in `doc`, one per line ("" when it is valid).
fn errors(schema: &jsonschema::Validator, doc: &Value) -> String {
    schema
        .iter_errors(doc)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The README's "Integrators' guide" section.
fn integrators_guide() -> &'static str {
    let start = README
        .find("## Integrators' guide")
        .expect("README.md has an Integrators' guide");
    let rest = &README[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// The body of the first block fenced as `lang` after `from` in `text`.
fn fenced_after<'a>(text: &'a str, from: usize, lang: &str) -> Option<(&'a str, usize)> {
    let open = format!("```{lang}\n");
    let start = text[from..].find(&open)? + from + open.len();
    let len = text[start..].find("\n```")?;
    Some((&text[start..start + len + 1], start + len + 4))
}

/// Every ```json block of the Integrators' guide, split into jobs (an object with `export_id`
/// and `fields`) and events (an object with `type`); other blocks are left alone.
fn readme_examples() -> (Vec<Value>, Vec<Value>) {
    let guide = integrators_guide();
    let (mut jobs, mut events) = (Vec::new(), Vec::new());
    let mut at = 0;
    while let Some((block, next)) = fenced_after(guide, at, "json") {
        at = next;
        let value: Value = serde_json::from_str(block)
            .unwrap_or_else(|e| panic!("a README json block is not JSON ({e}):\n{block}"));
        if value.get("type").is_some() {
            events.push(value);
        } else if value.get("export_id").is_some() && value.get("fields").is_some() {
            jobs.push(value);
        }
    }
    (jobs, events)
}

/// The README's example job (the first).
fn readme_job() -> Value {
    readme_examples()
        .0
        .into_iter()
        .next()
        .expect("the README shows a job")
}

#[test]
fn the_readme_examples_match_the_schemas_and_the_types() {
    let (jobs, events) = readme_examples();
    assert!(
        !jobs.is_empty(),
        "no example job found in the Integrators' guide"
    );
    assert!(
        !events.is_empty(),
        "no example event found in the Integrators' guide"
    );
    let (job_schema, event_schema) = (validator(JOB_SCHEMA), validator(EVENT_SCHEMA));
    for job in &jobs {
        assert_eq!(errors(&job_schema, job), "", "the README's job: {job:#}");
        ExportJob::parse(job.to_string().as_bytes()).expect("the README's job parses");
    }
    for event in &events {
        assert_eq!(
            errors(&event_schema, event),
            "",
            "the README's event: {event:#}"
        );
        let parsed: Event = serde_json::from_value(event.clone()).expect("the README's event");
        assert_eq!(
            serde_json::to_value(&parsed).expect("an event serializes"),
            *event,
            "the README's event is what the fleet would write, key for key"
        );
    }
}

#[test]
fn the_job_schema_refuses_the_shapes_the_producer_refuses() {
    type Mutation = fn(&mut Value);
    let schema = validator(JOB_SCHEMA);
    let refused: [(&str, Mutation); 11] = [
        ("an unknown key", |j| j["tokn"] = json!("x")),
        ("an unknown key in source", |j| {
            j["source"]["path"] = json!("/x")
        }),
        ("an export id with a space", |j| {
            j["export_id"] = json!("a b")
        }),
        ("an empty workspace id", |j| j["workspace_id"] = json!("")),
        ("letters in the ad account", |j| {
            j["ad_account_id"] = json!("act_x1")
        }),
        ("an unknown field", |j| j["fields"] = json!(["fax"])),
        ("no field", |j| j["fields"] = json!([])),
        ("a field twice", |j| j["fields"] = json!(["email", "email"])),
        ("no notify", |j| {
            j.as_object_mut().expect("an object").remove("notify");
        }),
        ("a country without a numbering plan", |j| {
            j["default_phone_country"] = json!("XX")
        }),
        ("a blank segment name", |j| {
            j["segment"]["name"] = json!("  ")
        }),
    ];
    for (what, mutate) in refused {
        let mut job = readme_job();
        mutate(&mut job);
        assert!(!schema.is_valid(&job), "the schema accepts {what}");
        assert!(
            ExportJob::parse(job.to_string().as_bytes()).is_err(),
            "the producer accepts {what}"
        );
    }
    let accepted: [(&str, Mutation); 4] = [
        ("an ad account without act_", |j| {
            j["ad_account_id"] = json!("1234567890")
        }),
        ("a lowercase country", |j| {
            j["default_phone_country"] = json!("us")
        }),
        ("no version", |j| {
            j.as_object_mut().expect("an object").remove("version");
        }),
        ("a null optional key", |j| j["audience_name"] = Value::Null),
    ];
    for (what, mutate) in accepted {
        let mut job = readme_job();
        mutate(&mut job);
        assert_eq!(errors(&schema, &job), "", "the schema refuses {what}");
        ExportJob::parse(job.to_string().as_bytes())
            .unwrap_or_else(|e| panic!("the producer refuses {what}: {e}"));
    }
}

#[test]
fn every_kind_of_event_matches_the_schema() {
    let schema = validator(EVENT_SCHEMA);
    let events = [
        json!({"type": "shard.completed", "export_id": "exp-1", "field": "phone",
               "shard_index": 3, "failed": false}),
        json!({"type": "export.sealed", "export_id": "exp-1"}),
        json!({"type": "export.rejected", "export_id": "exp-1",
               "reason": "the workspace has no Facebook connection", "notify": ["a@example.com"]}),
        json!({"type": "connection.invalidated", "workspace_id": "ws-1", "export_id": null,
               "token_fingerprint": "0123456789abcdef", "code": 190, "subcode": 460,
               "message": "Error validating access token"}),
        json!({"type": "connection.changed", "workspace_id": "ws-1", "status": "disconnected",
               "at_ms": 1_764_000_000_000u64}),
        json!({"type": "export.followed_up", "export_id": "exp-1"}),
        json!({"type": "ad_account.unusable", "workspace_id": "ws-1", "ad_account_id": "1001",
               "export_id": "exp-1", "kind": "permission_lost", "code": 200, "subcode": null,
               "reason": "(#200) The user does not have permission", "at_ms": 1_764_000_000_000u64}),
    ];
    for event in events {
        let parsed: Event =
            serde_json::from_value(event.clone()).unwrap_or_else(|e| panic!("{e}: {event}"));
        let written = serde_json::to_value(&parsed).expect("an event serializes");
        assert_eq!(errors(&schema, &written), "", "{written:#}");
    }
    let mut unknown = json!({"type": "export.sealed", "export_id": "exp-1"});
    unknown["type"] = json!("export.exploded");
    assert!(!schema.is_valid(&unknown), "an unknown type is refused");
}

/// `<repo>/.tools/venv/bin/python`, with pika installed (`scripts/tools.sh`).
fn venv_python() -> PathBuf {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/python");
    let has_pika = std::process::Command::new(&python)
        .args(["-c", "import pika"])
        .output()
        .is_ok_and(|out| out.status.success());
    assert!(
        has_pika,
        "{} with pika is missing: run `just tools` (scripts/tools.sh installs it)",
        python.display()
    );
    python
}

/// The README's Python example, exactly as written.
fn python_example() -> &'static str {
    let marker = README
        .find(PYTHON_MARKER)
        .expect("README.md marks its Python example with `<!-- contracts: python-example`");
    let (block, _) = fenced_after(README, marker, "python")
        .expect("a ```python block follows the marker in README.md");
    block
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_python_example_publishes_a_job_and_gets_its_report() {
    let python = venv_python();
    let app = spawn_app().await;
    let segment = app.dir.join("segment.ndjson");
    let generated = generate(&segment, 2_000, 13).expect("segment written");
    let job = app.job("exp-python", &["email", "phone", "madid"], &segment);
    assert_eq!(
        errors(&validator(JOB_SCHEMA), &job),
        "",
        "the harness's job"
    );
    let job_file = app.dir.join("job.json");
    std::fs::write(&job_file, job.to_string()).expect("writing the job");
    let script = app.dir.join("export.py");
    std::fs::write(&script, python_example()).expect("writing the script");

    let run = tokio::process::Command::new(&python)
        .arg(&script)
        .env("AE_AMQP_URL", &app.settings.amqp_url)
        .env("AE_NAMESPACE", app.namespace())
        .env("JOB_FILE", &job_file)
        .env("TIMEOUT_SECS", "90")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the script ends within its own timeout")
        .expect("the script runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the script failed ({}):\n{stderr}",
        out.status
    );

    let printed: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("the script printed no JSON report ({e}):\n{stdout}"));
    let event_schema = validator(EVENT_SCHEMA);
    assert_eq!(errors(&event_schema, &printed), "", "{printed:#}");
    let Ok(Event::ExportFinished(report)) = serde_json::from_value::<Event>(printed.clone()) else {
        panic!("the script printed something else than export.finished: {printed:#}");
    };
    assert_eq!(report.export_id, "exp-python");
    assert_eq!(report.status, ExportStatus::Succeeded, "{report:?}");
    assert_eq!(report.members_read, generated.members);
    assert_eq!(report.audiences.len(), 3, "one audience per field");

    // The fleet finished that export, and the script printed its report as published.
    let finished = app.finished("exp-python", Duration::from_secs(10)).await;
    assert_eq!(finished, report);
    // Every event the fleet published on the way matches the schema too.
    for event in app.events() {
        let written = serde_json::to_value(&event).expect("an event serializes");
        assert_eq!(errors(&event_schema, &written), "", "{written:#}");
    }
    app.stop().await;
}
