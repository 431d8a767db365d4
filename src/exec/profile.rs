//! Access profiles: which input paths runs of "the same" action looked up, stored as a blob
//! in the CAS and found through the action cache under a key of their own, so the next run
//! (on any executor sharing the store) can prefetch them. The key, the format and their
//! bounds live here; `profiling.rs` records and replays them around a run.

use prost::Message;

use crate::cas::{ActionCache, Cas};
use crate::digest::Digest;
use crate::error::Result;
use crate::fs::record::{Entry, MAX_ENTRIES};
use crate::proto::reapi;
use crate::tree::check_name;

/// First line of a profile blob (the format's version).
const HEADER: &str = "casfs-access-profile 1\n";
/// Prefix of the key material: no Action encodes to bytes starting so (field 1 of an Action
/// is a message), so a profile key never names a real action's cache entry.
const DOMAIN: &[u8] = b"casfs access profile key v1\0";
/// The path of the profile blob in its ActionResult.
pub const OUTPUT_NAME: &str = "casfs-access-profile";
/// Largest profile blob read.
pub const MAX_PROFILE_BYTES: u64 = 16 << 20;
/// Longest path in a profile.
const MAX_PATH: usize = 4096;

/// Whether and how far executors learn and replay access profiles.
#[derive(Clone, Copy, Debug)]
pub struct ProfileConfig {
    /// Record, store and replay profiles (lazy input roots only).
    pub enabled: bool,
    /// Most bytes one run prefetches (a profile's paths, or the whole tree without one).
    pub budget: u64,
}

impl Default for ProfileConfig {
    fn default() -> Self {
        ProfileConfig { enabled: true, budget: 512 << 20 }
    }
}

/// The action-cache key of the profile of `command` run on `platform`: what stays the same
/// across runs of one build step. Left out: the input root (it changes with every edit),
/// the Action's timeout, salt and do_not_cache, and the Command's output_node_properties
/// and output_directory_format. Kept: arguments, environment (sorted), working directory,
/// output paths (sorted) and the platform properties (the Action's, else the Command's;
/// sorted).
pub fn key(command: &reapi::Command, action: &reapi::Action) -> Digest {
    let mut env = command.environment_variables.clone();
    env.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    let mut properties =
        action.platform.as_ref().or(command.platform.as_ref()).map(|p| p.properties.clone()).unwrap_or_default();
    properties.sort_by(|a, b| (&a.name, &a.value).cmp(&(&b.name, &b.value)));
    let stable = reapi::Command {
        arguments: command.arguments.clone(),
        environment_variables: env,
        output_files: sorted(&command.output_files),
        output_directories: sorted(&command.output_directories),
        output_paths: sorted(&command.output_paths),
        platform: Some(reapi::Platform { properties }),
        working_directory: command.working_directory.clone(),
        ..Default::default()
    };
    let mut material = DOMAIN.to_vec();
    material.extend(stable.encode_to_vec());
    Digest::of_bytes(&material)
}

/// A profile blob: the header, then one line per path, `d <path>` or `f <path>`, sorted.
pub fn encode(entries: &[Entry]) -> Vec<u8> {
    let mut out = HEADER.as_bytes().to_vec();
    for e in entries.iter().take(MAX_ENTRIES) {
        out.extend_from_slice(if e.dir { b"d " } else { b"f " });
        out.extend_from_slice(e.path.as_bytes());
        out.push(b'\n');
    }
    out
}

/// The entries of a profile blob. A blob of another format is an error; lines that are not
/// valid relative paths are skipped; past [`MAX_ENTRIES`] the rest is ignored.
pub fn decode(bytes: &[u8]) -> std::result::Result<Vec<Entry>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let body = text.strip_prefix(HEADER).ok_or("not a casfs access profile (version 1)")?;
    let mut out = Vec::new();
    for line in body.lines() {
        if out.len() >= MAX_ENTRIES {
            break;
        }
        let (dir, path) = match (line.strip_prefix("d "), line.strip_prefix("f ")) {
            (Some(p), _) => (true, p),
            (_, Some(p)) => (false, p),
            _ => continue,
        };
        if path.len() > MAX_PATH || path.split('/').any(|p| check_name(p).is_err()) {
            continue;
        }
        out.push(Entry { path: path.to_string(), dir });
    }
    Ok(out)
}

/// What looking a profile up found.
#[derive(Debug)]
pub enum Found {
    /// A usable profile.
    Hit(Vec<Entry>),
    /// None stored.
    Miss,
    /// One stored but unusable (why).
    Invalid(String),
}

/// Looks the profile under `key` up: the AC entry, then its blob (verified, bounded).
pub async fn load(cas: &dyn Cas, ac: &dyn ActionCache, key: &Digest) -> Result<Found> {
    let Some(r) = ac.get_action_result(key).await? else { return Ok(Found::Miss) };
    let Some(d) = r.output_files.iter().find(|f| f.path == OUTPUT_NAME).and_then(|f| f.digest.as_ref()) else {
        return Ok(Found::Invalid("the entry names no profile blob".into()));
    };
    let d = match Digest::try_from(d) {
        Ok(d) if d.size() <= MAX_PROFILE_BYTES => d,
        Ok(d) => return Ok(Found::Invalid(format!("profile blob {d} is too large"))),
        Err(e) => return Ok(Found::Invalid(format!("bad profile digest: {e}"))),
    };
    let bytes = match cas.read(&d).await {
        Ok(b) => b,
        Err(crate::error::Error::MissingBlob(_)) => return Ok(Found::Miss),
        Err(e) => return Err(e),
    };
    Ok(match decode(&bytes) {
        Ok(entries) => Found::Hit(entries),
        Err(why) => Found::Invalid(why),
    })
}

/// Stores `entries` as the profile under `key`: the blob first, then the AC entry naming it.
pub async fn store(cas: &dyn Cas, ac: &dyn ActionCache, key: &Digest, entries: &[Entry]) -> Result<()> {
    let blob = encode(entries);
    let d = Digest::of_bytes(&blob);
    cas.write(&d, blob.into()).await?;
    let result = reapi::ActionResult {
        output_files: vec![reapi::OutputFile {
            path: OUTPUT_NAME.into(),
            digest: Some(d.to_proto()),
            ..Default::default()
        }],
        ..Default::default()
    };
    ac.update_action_result(key, &result).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_round_trip_and_hostile_lines_are_skipped() {
        let e = vec![Entry { path: "a".into(), dir: true }, Entry { path: "a/b c".into(), dir: false }];
        assert_eq!(decode(&encode(&e)).unwrap(), e);
        let hostile = format!("{HEADER}f ../etc/passwd\nf a//b\nx junk\nf /abs\nd ok\n");
        assert_eq!(decode(hostile.as_bytes()).unwrap(), vec![Entry { path: "ok".into(), dir: true }]);
        assert!(decode(b"\xff\xfe garbage").is_err());
        assert!(decode(b"casfs-access-profile 2\n").is_err());
    }

    #[test]
    fn the_key_ignores_the_input_root_and_order_but_not_the_arguments() {
        let cmd = |args: &[&str], env: &[(&str, &str)]| reapi::Command {
            arguments: args.iter().map(|s| s.to_string()).collect(),
            environment_variables: env
                .iter()
                .map(|(n, v)| reapi::command::EnvironmentVariable { name: n.to_string(), value: v.to_string() })
                .collect(),
            ..Default::default()
        };
        let a1 = reapi::Action { input_root_digest: Some(Digest::of_bytes(b"1").to_proto()), ..Default::default() };
        let a2 = reapi::Action { input_root_digest: Some(Digest::of_bytes(b"2").to_proto()), ..Default::default() };
        let c = cmd(&["cc", "x.c"], &[("A", "1"), ("B", "2")]);
        assert_eq!(key(&c, &a1), key(&c, &a2));
        assert_eq!(key(&c, &a1), key(&cmd(&["cc", "x.c"], &[("B", "2"), ("A", "1")]), &a1));
        assert_ne!(key(&c, &a1), key(&cmd(&["cc", "y.c"], &[("A", "1"), ("B", "2")]), &a1));
        let (action_digest, _) = Digest::of_message(&a1);
        assert_ne!(key(&c, &a1), action_digest);
    }
}
