//! Every digest function against independent tools (coreutils' sha1sum, md5sum, sha384sum,
//! sha512sum, sha256sum and b3sum), and storage/serving of blobs under each function.

use std::io::Write;
use std::process::{Command, Stdio};

use casfs::digest::{Digest, DigestFunction, Hasher};

use crate::common::*;

/// The command-line tool that prints `function`'s hash.
fn tool(function: DigestFunction) -> &'static str {
    match function {
        DigestFunction::Sha256 => "sha256sum",
        DigestFunction::Sha1 => "sha1sum",
        DigestFunction::Md5 => "md5sum",
        DigestFunction::Sha384 => "sha384sum",
        DigestFunction::Sha512 => "sha512sum",
        DigestFunction::Blake3 => "b3sum",
    }
}

/// Runs `tool` on `data` through stdin; None when the tool is not installed.
fn run_tool(tool: &str, data: &[u8]) -> TestResult<Option<String>> {
    let mut child = match Command::new(tool).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let mut stdin = child.stdin.take().ok_or("no stdin")?;
    let owned = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&owned));
    let out = child.wait_with_output()?;
    writer.join().map_err(|_| "writer panicked")??;
    assert!(out.status.success(), "{tool} failed");
    let text = String::from_utf8(out.stdout)?;
    Ok(Some(text.split_whitespace().next().ok_or("empty output")?.to_string()))
}

#[test]
fn every_function_agrees_with_its_command_line_tool() -> TestResult {
    let samples: Vec<Vec<u8>> =
        vec![Vec::new(), b"hello\n".to_vec(), pseudo_random(7, 1000), pseudo_random(8, (1 << 20) + 17)];
    for function in DigestFunction::ALL {
        for data in &samples {
            let Some(want) = run_tool(tool(function), data)? else {
                skip!("{} is not installed (scripts/lib/install.sh: apt_install b3sum)", tool(function));
            };
            let whole = Digest::of_bytes_with(function, data);
            assert_eq!(whole.hash_hex(), want, "{function} of {} bytes", data.len());
            assert_eq!(whole.size(), data.len() as u64);
            let mut h = Hasher::new_with(function);
            data.chunks(4099).for_each(|c| h.update(c));
            assert_eq!(h.finish(), whole, "{function} streamed");
            let file = tempfile::NamedTempFile::new()?;
            std::fs::write(file.path(), data)?;
            assert_eq!(casfs::digest::hash_file_with(function, file.path())?, whole);
        }
    }
    Ok(())
}
