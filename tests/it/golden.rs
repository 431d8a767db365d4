//! Canonical Directory digests checked against independently computed values, and the
//! validation of hostile Directory messages.

use prost::Message;

use casfs::digest::Digest;
use casfs::proto::reapi;
use casfs::tree::{build_local_tree, Directory};

use crate::common::*;

/// Root digest that BuildGrid's `bgd cas upload-dir` printed for the `g` fixture below, and
/// that a hand-built Python protobuf message reproduced (scripts/interop-buildgrid re-checks
/// agreement with bgd on a larger tree in every run).
const G_ROOT: &str = "cf6d996a42480b75c1a72dcee47aeece6ad45cb386be18ffc4bbd6fd2c4243e2/238";
/// The same tree plus `link -> a.txt`.
const G_LINK_ROOT: &str = "bea5ef77af2e7e466b056812484cc16737d86d95ed798eeb62b436aa0b12058a/253";
/// `g/sub` (one empty file).
const G_SUB: &str = "70a9a5e030074dc7eb69d167e91a47fadd3f14c14a52be85fd10f57cfb72dd0a/77";
/// sha256 of "hello\n" and of the script, as printed by sha256sum.
const HELLO: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";
const RUN_SH: &str = "299001868fb8c02fd431c336c6d058f5558c5dff5b5af5e6fe04b870a6a9cbba";
const EMPTY_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn make_g(root: &std::path::Path, with_link: bool) -> TestResult {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(root.join("sub"))?;
    std::fs::write(root.join("a.txt"), "hello\n")?;
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho hi\n")?;
    std::fs::write(root.join("sub/empty"), "")?;
    std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))?;
    if with_link {
        std::os::unix::fs::symlink("a.txt", root.join("link"))?;
    }
    Ok(())
}

/// Protobuf wire encoding by hand: length-delimited field `tag` holding `body`.
fn ld(field: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![(field << 3) | 2];
    let mut n = body.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            break;
        }
        out.push(b | 0x80);
    }
    out.extend_from_slice(body);
    out
}

fn digest_msg(hash: &str, size: u8) -> Vec<u8> {
    let mut d = ld(1, hash.as_bytes());
    if size > 0 {
        d.extend_from_slice(&[0x10, size]);
    }
    d
}

fn file_node(name: &str, hash: &str, size: u8, exec: bool) -> Vec<u8> {
    let mut f = ld(1, name.as_bytes());
    f.extend(ld(2, &digest_msg(hash, size)));
    if exec {
        f.extend_from_slice(&[0x20, 0x01]);
    }
    ld(1, &f)
}

#[test]
fn empty_directory_digest_is_sha256_of_nothing() {
    let (d, bytes) = Directory::default().encode();
    assert!(bytes.is_empty());
    assert_eq!(d.to_string(), format!("{EMPTY_HASH}/0"));
}

#[test]
fn hand_encoded_bytes_match_our_encoding_and_bgd_digests() -> TestResult {
    let sub = file_node("empty", EMPTY_HASH, 0, false);
    assert_eq!(Digest::of_bytes(&sub).to_string(), G_SUB);
    let sub_d = Digest::parse(G_SUB)?;

    let mut g = file_node("a.txt", HELLO, 6, false);
    g.extend(file_node("run.sh", RUN_SH, 18, true));
    let mut dnode = ld(1, b"sub");
    dnode.extend(ld(2, &digest_msg(&sub_d.hash_hex(), 77)));
    g.extend(ld(2, &dnode));
    assert_eq!(Digest::of_bytes(&g).to_string(), G_ROOT);

    let mut link = ld(1, b"link");
    link.extend(ld(2, b"a.txt"));
    g.extend(ld(3, &link));
    assert_eq!(Digest::of_bytes(&g).to_string(), G_LINK_ROOT);

    // And the tree builder, walking real folders, lands on the same digests.
    let tmp = tempfile::tempdir()?;
    make_g(&tmp.path().join("g"), false)?;
    assert_eq!(build_local_tree(&tmp.path().join("g"), &|_| {})?.root.to_string(), G_ROOT);
    make_g(&tmp.path().join("gl"), true)?;
    let t = build_local_tree(&tmp.path().join("gl"), &|_| {})?;
    assert_eq!(t.root.to_string(), G_LINK_ROOT);
    assert_eq!(t.directories.len(), 2);
    assert_eq!(t.files.len(), 3);
    Ok(())
}

fn node(name: &str) -> reapi::FileNode {
    reapi::FileNode { name: name.into(), digest: Some(Digest::of_bytes(b"").to_proto()), ..Default::default() }
}

#[test]
fn hostile_directories_are_rejected() {
    let ok = reapi::Directory { files: vec![node("a"), node("b")], ..Default::default() };
    assert!(Directory::validate(&ok, "ok").is_ok());
    let dir_node = |n: &str| reapi::DirectoryNode { name: n.into(), digest: Some(Digest::of_bytes(b"").to_proto()) };
    let cases: Vec<(&str, reapi::Directory)> = vec![
        ("unsorted", reapi::Directory { files: vec![node("b"), node("a")], ..Default::default() }),
        ("duplicate", reapi::Directory { files: vec![node("a"), node("a")], ..Default::default() }),
        ("slash", reapi::Directory { files: vec![node("a/b")], ..Default::default() }),
        ("dot", reapi::Directory { files: vec![node(".")], ..Default::default() }),
        ("dotdot", reapi::Directory { directories: vec![dir_node("..")], ..Default::default() }),
        ("empty name", reapi::Directory { files: vec![node("")], ..Default::default() }),
        ("nul", reapi::Directory { files: vec![node("a\0b")], ..Default::default() }),
        (
            "file and dir with one name",
            reapi::Directory { files: vec![node("x")], directories: vec![dir_node("x")], ..Default::default() },
        ),
        (
            "negative size",
            reapi::Directory {
                files: vec![reapi::FileNode {
                    name: "a".into(),
                    digest: Some(reapi::Digest { hash: EMPTY_HASH.into(), size_bytes: -1 }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "bad hash",
            reapi::Directory {
                files: vec![reapi::FileNode {
                    name: "a".into(),
                    digest: Some(reapi::Digest { hash: "xyz".into(), size_bytes: 1 }),
                    ..Default::default()
                }],
                ..Default::default()
            },
        ),
        (
            "no digest",
            reapi::Directory {
                files: vec![reapi::FileNode { name: "a".into(), ..Default::default() }],
                ..Default::default()
            },
        ),
        (
            "empty symlink target",
            reapi::Directory {
                symlinks: vec![reapi::SymlinkNode { name: "l".into(), target: String::new(), node_properties: None }],
                ..Default::default()
            },
        ),
    ];
    for (what, msg) in cases {
        let err = Directory::validate(&msg, what).expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what}: {err}");
        // Decoding from bytes (entry by entry) refuses the same messages.
        let bytes = msg.encode_to_vec();
        let err = Directory::decode(&Digest::of_bytes(&bytes), &bytes).expect_err(what);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{what} (decoded): {err}");
    }
    // Node properties and fields unknown to casfs are read past, as a whole-message decode does.
    let mut with_extras = reapi::Directory {
        files: vec![node("a")],
        directories: vec![dir_node("d")],
        symlinks: vec![reapi::SymlinkNode { name: "l".into(), target: "a".into(), node_properties: None }],
        node_properties: Some(reapi::NodeProperties { unix_mode: Some(0o755), ..Default::default() }),
    }
    .encode_to_vec();
    with_extras.extend_from_slice(&[0x78, 0x01]); // field 15, varint 1
    let d = Directory::decode(&Digest::of_bytes(&with_extras), &with_extras).expect("extras");
    let whole = reapi::Directory::decode(&with_extras[..]).expect("prost");
    assert_eq!(d, Directory::validate(&whole, "whole").expect("valid"));
    // A truncated message is refused.
    let cut = &with_extras[..with_extras.len() - 5];
    assert!(Directory::decode(&Digest::of_bytes(cut), cut).is_err());
    // Bytes that are not a Directory at all.
    let junk = b"\xff\xff\xff\xff";
    assert!(Directory::decode(&Digest::of_bytes(junk), junk).is_err());
    // Round trip of a valid message keeps every entry.
    let bytes = ok.encode_to_vec();
    let v = Directory::decode(&Digest::of_bytes(&bytes), &bytes).expect("valid");
    assert_eq!(v.to_proto(), ok);
}
