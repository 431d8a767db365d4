//! An Action and its Command, validated into what the executor needs (conformance rules 3-11):
//! argv, environment, working directory, expected outputs, timeout and platform.

use std::time::Duration;

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::proto::reapi;
use crate::tree::check_name;

/// What kind of output a path was declared as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// `output_files` (v2.0): must be a file (or symlink) if present.
    File,
    /// `output_directories` (v2.0): must be a directory (or symlink) if present.
    Directory,
    /// `output_paths` (v2.1+): whatever it turns out to be.
    Any,
}

/// One expected output, relative to the working directory (`""` = the working directory).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputSpec {
    /// Path relative to the working directory, as the client wrote it (and as it is reported).
    pub path: String,
    /// The same place relative to the input root, without `.` or `..` (`""` = the root).
    pub in_root: String,
    /// How it was declared.
    pub kind: OutputKind,
}

/// Platform properties this executor understands (anything else is refused, rule 9).
pub const SUPPORTED_PROPERTIES: [&str; 6] =
    ["OSFamily", "ISA", "network", "run-as-root", "hermetic", "container-image"];

/// Executor limits applied while validating.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Timeout when the Action sets none.
    pub default_timeout: Duration,
    /// Longest timeout accepted; more is INVALID_ARGUMENT (rule 11).
    pub max_timeout: Duration,
    /// Honour `run-as-root=true` (uid 0 inside the action's user namespace); without it such
    /// an action is INVALID_ARGUMENT.
    pub allow_root_actions: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            default_timeout: Duration::from_secs(900),
            max_timeout: Duration::from_secs(3600),
            allow_root_actions: false,
        }
    }
}

/// A validated Action + Command.
#[derive(Clone, Debug)]
pub struct ActionSpec {
    /// The Action's digest.
    pub action: Digest,
    /// The Command's digest.
    pub command: Digest,
    /// Root Directory of the inputs.
    pub input_root: Digest,
    /// Arguments, `argv[0]` first.
    pub argv: Vec<String>,
    /// The complete environment (nothing inherited, rule 5).
    pub env: Vec<(String, String)>,
    /// Working directory relative to the input root (`""` = the root).
    pub working_directory: String,
    /// Declared outputs.
    pub outputs: Vec<OutputSpec>,
    /// Wall-clock limit.
    pub timeout: Duration,
    /// Never read from or written to the action cache.
    pub do_not_cache: bool,
    /// Whether the command may use the network (`network=true`).
    pub network: bool,
    /// Whether the command runs as root of its user namespace (`run-as-root=true`).
    pub run_as_root: bool,
    /// No host folder in the command's view, only the input root (`hermetic=true`).
    pub hermetic: bool,
    /// How output directories are reported.
    pub output_directory_format: i32,
}

/// Checks a relative path: non-empty components, no `.`/`..`, not absolute.
pub fn check_relative(path: &str, what: &str) -> Result<()> {
    if path.is_empty() {
        return Ok(());
    }
    if path.starts_with('/') {
        return Err(Error::InvalidArgument(format!("{what} {path:?} is absolute")));
    }
    for part in path.split('/') {
        check_name(part).map_err(|why| Error::InvalidArgument(format!("{what} {path:?}: {why}")))?;
    }
    Ok(())
}

/// Where an output path (relative to the working directory, as clients such as BuildStream
/// write it: `.` or `../../install`) is relative to the input root; an error when it is
/// absolute or leaves the root.
pub fn output_in_root(working_directory: &str, path: &str) -> Result<String> {
    if path.starts_with('/') {
        return Err(Error::InvalidArgument(format!("output path {path:?} is absolute")));
    }
    let mut parts: Vec<&str> = working_directory.split('/').filter(|p| !p.is_empty()).collect();
    for part in path.split('/') {
        match part {
            "." => {}
            ".." => {
                if parts.pop().is_none() {
                    return Err(Error::InvalidArgument(format!(
                        "output path {path:?} leaves the input root (working directory {working_directory:?})"
                    )));
                }
            }
            // `a//b` and a trailing `/` are how some clients spell `a/b`; an empty path is ".".
            "" => {}
            name => {
                check_name(name).map_err(|why| Error::InvalidArgument(format!("output path {path:?}: {why}")))?;
                parts.push(name);
            }
        }
    }
    Ok(parts.join("/"))
}

/// The environment sorted by name (REAPI asks clients to sort it; BuildStream does not, and
/// order carries no meaning); a name set twice is refused, since which value wins would be
/// a guess.
fn sorted_environment(vars: &[reapi::command::EnvironmentVariable]) -> Result<Vec<(String, String)>> {
    let mut env = Vec::with_capacity(vars.len());
    for v in vars {
        if v.name.is_empty() || v.name.contains('=') || v.name.contains('\0') || v.value.contains('\0') {
            return Err(Error::InvalidArgument(format!("bad environment variable {:?}", v.name)));
        }
        env.push((v.name.clone(), v.value.clone()));
    }
    env.sort();
    if let Some(w) = env.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::InvalidArgument(format!(
            "environment variable {:?} is set twice ({:?} and {:?})",
            w[0].0, w[0].1, w[1].1
        )));
    }
    Ok(env)
}

/// The properties that apply: the Action's platform when set (v2.2), else the Command's.
fn platform<'a>(action: &'a reapi::Action, command: &'a reapi::Command) -> &'a [reapi::platform::Property] {
    match (&action.platform, &command.platform) {
        (Some(p), _) if !p.properties.is_empty() => &p.properties,
        (_, Some(p)) => &p.properties,
        _ => &[],
    }
}

impl ActionSpec {
    /// Validates an Action and its Command.
    pub fn new(
        action_digest: Digest,
        action: &reapi::Action,
        command_digest: Digest,
        command: &reapi::Command,
        limits: &Limits,
    ) -> Result<Self> {
        let input_root = action
            .input_root_digest
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("action has no input_root_digest".into()))
            .and_then(|d| Ok(Digest::from_proto_with(action_digest.function(), d)?))?;
        if command.arguments.is_empty() || command.arguments[0].is_empty() {
            return Err(Error::InvalidArgument("command has no arguments".into()));
        }
        let env = sorted_environment(&command.environment_variables)?;
        let wd = &command.working_directory;
        check_relative(wd, "working_directory")?;
        let output = |path: &String, kind| -> Result<OutputSpec> {
            Ok(OutputSpec { path: path.clone(), in_root: output_in_root(wd, path)?, kind })
        };
        let outputs = if !command.output_paths.is_empty() {
            command.output_paths.iter().map(|p| output(p, OutputKind::Any)).collect::<Result<Vec<_>>>()?
        } else {
            let mut v: Vec<OutputSpec> = command
                .output_files
                .iter()
                .map(|p| output(p, OutputKind::File))
                .chain(command.output_directories.iter().map(|p| output(p, OutputKind::Directory)))
                .collect::<Result<_>>()?;
            v.sort_by(|a, b| a.path.cmp(&b.path));
            v
        };
        for o in &outputs {
            if o.kind == OutputKind::File && (o.in_root.is_empty() || o.in_root == wd.trim_matches('/')) {
                return Err(Error::InvalidArgument(format!("output file {:?} is a folder of the input root", o.path)));
            }
        }
        if let Some(p) = command.output_node_properties.first() {
            return Err(Error::InvalidArgument(format!("output node property {p:?} is not supported")));
        }
        let (mut network, mut run_as_root, mut hermetic) = (false, false, false);
        let yes = |v: &str| matches!(v, "true" | "on" | "1" | "yes");
        for p in platform(action, command) {
            match (p.name.as_str(), p.value.as_str()) {
                ("OSFamily", v) if v.eq_ignore_ascii_case("linux") => {}
                ("ISA", "x86-64") if cfg!(target_arch = "x86_64") => {}
                ("ISA", "arm-a64") if cfg!(target_arch = "aarch64") => {}
                ("network", v) => network = yes(v),
                ("run-as-root", v) => run_as_root = yes(v),
                ("hermetic", v) => hermetic = yes(v),
                ("container-image", "") => {}
                (name, value) => {
                    return Err(Error::InvalidArgument(format!(
                        "platform property {name}={value} is not supported here (supported: OSFamily=linux, ISA, network, run-as-root, hermetic, empty container-image)"
                    )))
                }
            }
        }
        if run_as_root && !limits.allow_root_actions {
            return Err(Error::InvalidArgument(
                "platform property run-as-root=true: this executor does not run actions as root (its operator did not pass --allow-root-actions)".into(),
            ));
        }
        let timeout = match &action.timeout {
            Some(t) if t.seconds < 0 || t.nanos < 0 => {
                return Err(Error::InvalidArgument("negative timeout".into()));
            }
            Some(t) if t.seconds > 0 || t.nanos > 0 => Duration::new(t.seconds as u64, t.nanos as u32),
            _ => limits.default_timeout,
        };
        if timeout > limits.max_timeout {
            return Err(Error::InvalidArgument(format!(
                "timeout {timeout:?} is over this executor's maximum of {:?}",
                limits.max_timeout
            )));
        }
        Ok(ActionSpec {
            action: action_digest,
            command: command_digest,
            input_root,
            argv: command.arguments.clone(),
            env,
            working_directory: command.working_directory.clone(),
            outputs,
            timeout,
            do_not_cache: action.do_not_cache,
            network,
            run_as_root,
            hermetic,
            output_directory_format: command.output_directory_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd() -> reapi::Command {
        reapi::Command {
            arguments: vec!["/bin/true".into()],
            environment_variables: vec![
                reapi::command::EnvironmentVariable { name: "A".into(), value: "1".into() },
                reapi::command::EnvironmentVariable { name: "B".into(), value: "2".into() },
            ],
            output_files: vec!["z.o".into(), "a.o".into()],
            output_directories: vec!["d".into()],
            ..Default::default()
        }
    }

    fn action() -> reapi::Action {
        reapi::Action { input_root_digest: Some(Digest::of_bytes(b"").to_proto()), ..Default::default() }
    }

    fn spec(a: &reapi::Action, c: &reapi::Command) -> Result<ActionSpec> {
        ActionSpec::new(Digest::of_bytes(b"a"), a, Digest::of_bytes(b"c"), c, &Limits::default())
    }

    #[test]
    fn old_output_fields_and_output_paths() {
        let s = spec(&action(), &cmd()).unwrap();
        let paths: Vec<&str> = s.outputs.iter().map(|o| o.path.as_str()).collect();
        assert_eq!(paths, ["a.o", "d", "z.o"]);
        let mut c = cmd();
        c.output_paths = vec!["x".into()];
        let x = OutputSpec { path: "x".into(), in_root: "x".into(), kind: OutputKind::Any };
        assert_eq!(spec(&action(), &c).unwrap().outputs, vec![x]);
    }

    #[test]
    fn refuses_what_the_spec_says_to_refuse() {
        let mut c = cmd();
        c.arguments.clear();
        assert!(spec(&action(), &c).is_err());
        let mut c = cmd();
        c.environment_variables.push(c.environment_variables[0].clone());
        let err = spec(&action(), &c).unwrap_err().to_string();
        assert!(err.contains("\"A\" is set twice"), "{err}");
        let mut c = cmd();
        c.working_directory = "/abs".into();
        assert!(spec(&action(), &c).is_err());
        let mut c = cmd();
        c.output_files = vec!["../escape".into()];
        assert!(spec(&action(), &c).is_err());
        let mut c = cmd();
        c.platform = Some(reapi::Platform {
            properties: vec![reapi::platform::Property { name: "gpu".into(), value: "yes".into() }],
        });
        assert!(spec(&action(), &c).is_err(), "unknown platform property");
        let mut a = action();
        a.timeout = Some(prost_types::Duration { seconds: 100_000, nanos: 0 });
        assert_eq!(spec(&a, &cmd()).unwrap_err().code(), tonic::Code::InvalidArgument);
        let mut c = cmd();
        c.platform = Some(reapi::Platform {
            properties: vec![
                reapi::platform::Property { name: "OSFamily".into(), value: "linux".into() },
                reapi::platform::Property { name: "network".into(), value: "true".into() },
            ],
        });
        assert!(spec(&action(), &c).unwrap().network);
    }

    #[test]
    fn root_inside_only_when_the_operator_allows_it() {
        let mut c = cmd();
        c.platform = Some(reapi::Platform {
            properties: vec![reapi::platform::Property { name: "run-as-root".into(), value: "true".into() }],
        });
        let err = spec(&action(), &c).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.to_string().contains("--allow-root-actions"), "{err}");
        let allowed = Limits { allow_root_actions: true, ..Limits::default() };
        let s = ActionSpec::new(Digest::of_bytes(b"a"), &action(), Digest::of_bytes(b"c"), &c, &allowed).unwrap();
        assert!(s.run_as_root);
        assert!(!spec(&action(), &cmd()).unwrap().run_as_root);
    }

    #[test]
    fn liberal_in_what_buildstream_sends() {
        // Environment in any order: sorted.
        let mut c = cmd();
        c.environment_variables.reverse();
        let names: Vec<String> = spec(&action(), &c).unwrap().env.into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["A", "B"]);
        // Output paths relative to the working directory that stay inside the root.
        let mut c = cmd();
        c.working_directory = "buildstream/project/element".into();
        c.output_paths = vec![".".into(), "../../../buildstream-install".into(), "sub/./x/".into()];
        let s = spec(&action(), &c).unwrap();
        let places: Vec<(&str, &str)> = s.outputs.iter().map(|o| (o.path.as_str(), o.in_root.as_str())).collect();
        assert_eq!(
            places,
            [
                (".", "buildstream/project/element"),
                ("../../../buildstream-install", "buildstream-install"),
                ("sub/./x/", "buildstream/project/element/sub/x")
            ]
        );
        c.output_paths = vec!["../../..".into()];
        assert_eq!(spec(&action(), &c).unwrap().outputs[0].in_root, "", "the whole input root");
        for bad in ["../../../..", "../../../../etc", "/etc", "a/../../../../../x"] {
            c.output_paths = vec![bad.into()];
            let err = spec(&action(), &c).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{bad}: {err}");
        }
        let mut c = cmd();
        c.output_files = vec![".".into()];
        assert!(spec(&action(), &c).is_err(), "an output file cannot be the working directory");
    }

    #[test]
    fn hermetic_is_a_platform_property() {
        let mut c = cmd();
        assert!(!spec(&action(), &c).unwrap().hermetic);
        c.platform = Some(reapi::Platform {
            properties: vec![reapi::platform::Property { name: "hermetic".into(), value: "true".into() }],
        });
        assert!(spec(&action(), &c).unwrap().hermetic);
    }
}
