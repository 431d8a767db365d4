//! Readable JSON renderings of Action, Command and ActionResult messages (field names as in
//! the proto, digests as `hash/size`, timestamps as RFC 3339-like UTC text).

use serde_json::{json, Map, Value};

use crate::proto::reapi;

fn digest(d: &Option<reapi::Digest>) -> Value {
    match d {
        Some(d) => Value::String(format!("{}/{}", d.hash, d.size_bytes)),
        None => Value::Null,
    }
}

fn timestamp(t: &Option<prost_types::Timestamp>) -> Value {
    let Some(t) = t else { return Value::Null };
    // Civil-from-days (Howard Hinnant), enough for display without a date crate.
    let days = t.seconds.div_euclid(86_400);
    let secs = t.seconds.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Value::String(format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:09}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        t.nanos
    ))
}

fn duration(d: &Option<prost_types::Duration>) -> Value {
    match d {
        Some(d) => Value::String(format!("{}.{:09}s", d.seconds, d.nanos)),
        None => Value::Null,
    }
}

fn platform(p: &Option<reapi::Platform>) -> Value {
    match p {
        Some(p) => Value::Array(p.properties.iter().map(|x| json!({"name": x.name, "value": x.value})).collect()),
        None => Value::Null,
    }
}

fn symlinks(list: &[reapi::OutputSymlink]) -> Value {
    Value::Array(list.iter().map(|s| json!({"path": s.path, "target": s.target})).collect())
}

fn text(v: Value) -> String {
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s
}

/// An Action as JSON text.
pub fn action_json(a: &reapi::Action) -> String {
    text(json!({
        "command_digest": digest(&a.command_digest),
        "input_root_digest": digest(&a.input_root_digest),
        "timeout": duration(&a.timeout),
        "do_not_cache": a.do_not_cache,
        "salt": hex::encode(&a.salt),
        "platform": platform(&a.platform),
    }))
}

/// A Command as JSON text.
pub fn command_json(c: &reapi::Command) -> String {
    let env: Map<String, Value> =
        c.environment_variables.iter().map(|e| (e.name.clone(), Value::String(e.value.clone()))).collect();
    text(json!({
        "arguments": c.arguments,
        "environment_variables": env,
        "working_directory": c.working_directory,
        "output_paths": c.output_paths,
        "output_files": c.output_files,
        "output_directories": c.output_directories,
        "output_node_properties": c.output_node_properties,
        "output_directory_format": c.output_directory_format,
        "platform": platform(&c.platform),
    }))
}

/// An ActionResult as JSON text.
pub fn action_result_json(r: &reapi::ActionResult) -> String {
    let meta = r.execution_metadata.as_ref().map(|m| {
        json!({
            "worker": m.worker,
            "queued_timestamp": timestamp(&m.queued_timestamp),
            "worker_start_timestamp": timestamp(&m.worker_start_timestamp),
            "worker_completed_timestamp": timestamp(&m.worker_completed_timestamp),
            "input_fetch_start_timestamp": timestamp(&m.input_fetch_start_timestamp),
            "input_fetch_completed_timestamp": timestamp(&m.input_fetch_completed_timestamp),
            "execution_start_timestamp": timestamp(&m.execution_start_timestamp),
            "execution_completed_timestamp": timestamp(&m.execution_completed_timestamp),
            "virtual_execution_duration": duration(&m.virtual_execution_duration),
            "output_upload_start_timestamp": timestamp(&m.output_upload_start_timestamp),
            "output_upload_completed_timestamp": timestamp(&m.output_upload_completed_timestamp),
        })
    });
    text(json!({
        "exit_code": r.exit_code,
        "output_files": r.output_files.iter().map(|f| json!({
            "path": f.path, "digest": digest(&f.digest), "is_executable": f.is_executable,
        })).collect::<Vec<_>>(),
        "output_directories": r.output_directories.iter().map(|d| json!({
            "path": d.path,
            "tree_digest": digest(&d.tree_digest),
            "root_directory_digest": digest(&d.root_directory_digest),
            "is_topologically_sorted": d.is_topologically_sorted,
        })).collect::<Vec<_>>(),
        "output_symlinks": symlinks(&r.output_symlinks),
        "output_file_symlinks": symlinks(&r.output_file_symlinks),
        "output_directory_symlinks": symlinks(&r.output_directory_symlinks),
        "stdout_digest": digest(&r.stdout_digest),
        "stderr_digest": digest(&r.stderr_digest),
        "stdout_raw_bytes": r.stdout_raw.len(),
        "stderr_raw_bytes": r.stderr_raw.len(),
        "execution_metadata": meta,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_render_as_utc_text() {
        let t = Some(prost_types::Timestamp { seconds: 946_684_800, nanos: 5 });
        assert_eq!(timestamp(&t), Value::String("2000-01-01T00:00:00.000000005Z".into()));
        let t = Some(prost_types::Timestamp { seconds: 1_764_460_800 + 3661, nanos: 0 });
        assert_eq!(timestamp(&t), Value::String("2025-11-30T01:01:01.000000000Z".into()));
    }

    #[test]
    fn action_result_has_its_fields() {
        let r = reapi::ActionResult { exit_code: 7, ..Default::default() };
        let j: Value = serde_json::from_str(&action_result_json(&r)).unwrap();
        assert_eq!(j["exit_code"], 7);
    }
}
