//! What a command sees and may name, as sysroot clients (BuildStream) use it: a bare argv[0]
//! found in the input root's own folders rather than the host's, a hermetic view with no
//! host folders, output paths relative to the working directory (`.`, `../..`), and an
//! environment sent in any order.

use std::path::Path;

use prost::Message;

use casfs::cas::Cas;
use casfs::digest::Digest;
use casfs::proto::reapi;

use crate::common::*;
use crate::exec::{rig, stdout_of, Rig};

/// A sysroot: an empty `usr/bin` (so the host's /usr is not bound) and `bin/ls`, a static
/// tool (the host's /usr/bin/ls exists: it must not be what runs).
fn sysroot(input: &Path) -> TestResult {
    std::fs::create_dir_all(input.join("usr/bin"))?;
    std::fs::create_dir_all(input.join("bin"))?;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/sysroot_tool.c");
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(input.join("bin/ls"))
        .arg(&src)
        .output()?;
    if !out.status.success() {
        return Err(format!("gcc -static: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    Ok(())
}

struct Cmd<'a> {
    argv: &'a [&'a str],
    env: &'a [(&'a str, &'a str)],
    working_directory: &'a str,
    output_paths: &'a [&'a str],
    hermetic: bool,
}

/// Uploads `input` and an Action running `c` on it, the environment sent in the given order.
async fn upload(r: &Rig, input: &Path, c: &Cmd<'_>) -> TestResult<Digest> {
    let root = casfs::transfer::upload_dir(&*r.client, input, false).await?.root;
    let mut properties = vec![reapi::platform::Property { name: "OSFamily".into(), value: "linux".into() }];
    if c.hermetic {
        properties.push(reapi::platform::Property { name: "hermetic".into(), value: "true".into() });
    }
    let command = reapi::Command {
        arguments: c.argv.iter().map(|s| s.to_string()).collect(),
        environment_variables: c
            .env
            .iter()
            .map(|(n, v)| reapi::command::EnvironmentVariable { name: n.to_string(), value: v.to_string() })
            .collect(),
        working_directory: c.working_directory.into(),
        output_paths: c.output_paths.iter().map(|s| s.to_string()).collect(),
        platform: Some(reapi::Platform { properties }),
        ..Default::default()
    };
    let cb = command.encode_to_vec();
    let cd = Digest::of_bytes(&cb);
    r.client.write(&cd, cb.into()).await?;
    let action = reapi::Action {
        command_digest: Some(cd.to_proto()),
        input_root_digest: Some(root.to_proto()),
        ..Default::default()
    };
    let ab = action.encode_to_vec();
    let ad = Digest::of_bytes(&ab);
    r.client.write(&ad, ab.into()).await?;
    Ok(ad)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_argv0_runs_from_the_input_roots_own_folders() -> TestResult {
    require_fuse!();
    let r = rig(1024)?;
    let input = r.work.with_file_name("input-sysroot");
    sysroot(&input)?;
    // BuildStream's environment arrives unsorted.
    let env = [("PATH", "/usr/bin:/bin"), ("LOGNAME", "x"), ("USERNAME", "x")];
    let c = Cmd { argv: &["ls", "?/etc/passwd"], env: &env, working_directory: "", output_paths: &[], hermetic: false };
    let action = upload(&r, &input, &c).await?;
    let o = r.exec.execute(action, true).await?;
    let out = stdout_of(&r, &o).await?;
    assert_eq!(o.result.exit_code, 0, "{out}");
    assert!(out.starts_with("argv0=/bin/ls\n"), "ran the root's own bin/ls: {out}");
    // Not hermetic: the host's /etc is bound in (the input has none).
    assert!(out.contains("/etc/passwd present"), "{out}");

    // Hermetic (platform property): nothing of the host, the same tool still found.
    let c = Cmd { hermetic: true, ..c };
    let action = upload(&r, &input, &c).await?;
    let o = r.exec.execute(action, true).await?;
    let out = stdout_of(&r, &o).await?;
    assert_eq!(o.result.exit_code, 0, "{out}");
    assert!(out.contains("/etc/passwd absent"), "a hermetic action saw a host folder: {out}");

    // A tool that is nowhere in the view is a clear error, not the host's copy.
    let c = Cmd { argv: &["cat", "x"], hermetic: false, ..c };
    let action = upload(&r, &input, &c).await?;
    let err = r.exec.execute(action, true).await.expect_err("cat is not in the sysroot");
    assert!(err.to_string().contains("\"cat\" not found"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_paths_relative_to_the_working_directory() -> TestResult {
    require_fuse!();
    let r = rig(1024)?;
    let input = r.work.with_file_name("input-outputs");
    sysroot(&input)?;
    std::fs::create_dir_all(input.join("buildstream/project/element"))?;
    std::fs::write(input.join("buildstream/project/element/source.c"), "int x;\n")?;
    // As BuildStream runs a `manual` element.
    let c = Cmd {
        argv: &["ls", "w:build.log:built\n", "w:../../../buildstream-install/usr/bin/hello:hi\n"],
        env: &[("PATH", "/usr/bin:/bin")],
        working_directory: "buildstream/project/element",
        output_paths: &[".", "../../../buildstream-install"],
        hermetic: true,
    };
    let action = upload(&r, &input, &c).await?;
    let o = r.exec.execute(action, true).await?;
    assert_eq!(o.result.exit_code, 0, "{}", stdout_of(&r, &o).await?);
    let dirs: Vec<&str> = o.result.output_directories.iter().map(|d| d.path.as_str()).collect();
    assert_eq!(dirs, [".", "../../../buildstream-install"], "reported as the client named them");
    for (i, want) in [(0, vec!["build.log", "source.c"]), (1, vec!["usr"])] {
        let d = &o.result.output_directories[i];
        let tree = Digest::try_from(d.tree_digest.as_ref().ok_or("tree")?)?;
        let tree = reapi::Tree::decode(r.client.read(&tree).await?)?;
        let root = tree.root.ok_or("root")?;
        let mut got: Vec<String> = root.files.iter().map(|f| f.name.clone()).collect();
        got.extend(root.directories.iter().map(|d| d.name.clone()));
        got.sort();
        assert_eq!(got, want, "output directory {}", d.path);
    }

    // Paths that leave the input root are refused before anything runs.
    let c = Cmd { output_paths: &["../../../.."], ..c };
    let action = upload(&r, &input, &c).await?;
    let err = r.exec.execute(action, true).await.expect_err("escapes the root");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.to_string().contains("leaves the input root"), "{err}");
    Ok(())
}
