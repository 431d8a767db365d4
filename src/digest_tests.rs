//! Unit tests of digest.rs: text forms, errors and fixed vectors for every function.

use super::*;

const HELLO: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

#[test]
fn empty_blob_constant_matches_sha256_of_nothing() {
    assert_eq!(Digest::of_bytes(b""), EMPTY);
    assert_eq!(EMPTY.hash_hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

#[test]
fn both_text_forms_round_trip() {
    // sha256("hello\n"), as printed by sha256sum.
    let d = Digest::parse(&format!("{HELLO}/6")).unwrap();
    assert_eq!(d, Digest::of_bytes(b"hello\n"));
    assert_eq!(Digest::parse(&format!("{HELLO}-6")).unwrap(), d);
    assert_eq!(d.to_string(), format!("{HELLO}/6"));
    assert_eq!(d.to_path_form(), format!("{HELLO}-6"));
}

#[test]
fn upper_case_hex_is_refused_by_name() {
    let upper = HELLO.to_uppercase();
    assert!(matches!(Digest::parse(&format!("{upper}/6")), Err(DigestError::UpperCase(_))));
    let mixed = format!("{}A{}", &HELLO[..10], &HELLO[11..]);
    let e = Digest::from_parts(&mixed, 6).unwrap_err();
    assert!(e.to_string().contains("lower-case"), "{e}");
    let wire = reapi::Digest { hash: upper, size_bytes: 6 };
    assert!(matches!(Digest::try_from(&wire), Err(DigestError::UpperCase(_))));
}

#[test]
fn bad_input_gives_specific_errors() {
    assert!(matches!(Digest::parse("nohash"), Err(DigestError::Form(_))));
    assert!(matches!(Digest::parse("zz/1"), Err(DigestError::BadHex(_))));
    assert!(matches!(Digest::parse("abcd/1"), Err(DigestError::WrongLength { got: 4, .. })));
    assert!(matches!(Digest::parse(&format!("{HELLO}/-1")), Err(DigestError::NegativeSize(-1))));
    assert!(matches!(Digest::parse(&format!("{HELLO}/x")), Err(DigestError::BadSize(_))));
    assert!(matches!(Digest::parse(&format!("{HELLO}/99999999999999999999")), Err(DigestError::BadSize(_))));
    assert!(DigestFunction::from_proto(4).is_err(), "VSO is not supported");
    assert_eq!(DigestFunction::from_proto(0).unwrap(), DigestFunction::Sha256);
}

/// (function, hash of "hello\n", hash of nothing) as printed by sha256sum, sha1sum, md5sum,
/// sha384sum, sha512sum and b3sum.
const VECTORS: [(DigestFunction, &str, &str); 6] = [
    (DigestFunction::Sha256, HELLO, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"),
    (DigestFunction::Sha1, "f572d396fae9206628714fb2ce00f72e94f2258f", "da39a3ee5e6b4b0d3255bfef95601890afd80709"),
    (DigestFunction::Md5, "b1946ac92492d2347c6235b4d2611184", "d41d8cd98f00b204e9800998ecf8427e"),
    (
        DigestFunction::Sha384,
        "1d0f284efe3edea4b9ca3bd514fa134b17eae361ccc7a1eefeff801b9bd6604e01f21f6bf249ef030599f0c218f2ba8c",
        "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b",
    ),
    (
        DigestFunction::Sha512,
        "e7c22b994c59d9cf2b48e549b1e24666636045930d3da7c1acb299d1c3b7f931f94aae41edda2c2b207a36e10f8bcb8d45223e54878f5b316e7ce3b6bc019629",
        "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e",
    ),
    (
        DigestFunction::Blake3,
        "8e4c7c1b99dbfd50e7a95185fead5ee1448fa904a2fdd778eaf5f2dbfd629a99",
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
    ),
];

#[test]
fn every_function_matches_fixed_vectors() {
    for (f, hello, empty) in VECTORS {
        let d = Digest::of_bytes_with(f, b"hello\n");
        assert_eq!((d.hash_hex().as_str(), d.size(), d.function()), (hello, 6, f), "{f}");
        let mut h = Hasher::new_with(f);
        h.update(b"hel");
        h.update(b"lo\n");
        assert_eq!(h.finish(), d, "{f} streaming");
        assert_eq!(f.empty().hash_hex(), empty, "{f} empty");
        assert!(f.empty().is_empty_blob());
        assert_eq!(Digest::parse_with(f, &format!("{hello}/6")).unwrap(), d);
        assert_eq!(DigestFunction::from_proto(f.proto_value()).unwrap(), f);
        assert_eq!(f.name().parse::<DigestFunction>().unwrap(), f);
        assert_eq!(Digest::new_with(f, d.hash_bytes(), 6).unwrap(), d);
    }
}

#[test]
fn function_is_inferred_from_length_except_blake3() {
    for (f, hello, _) in VECTORS {
        let d = Digest::parse(&format!("{hello}/6")).unwrap();
        let inferred = if f == DigestFunction::Blake3 { DigestFunction::Sha256 } else { f };
        assert_eq!(d.function(), inferred);
        assert_eq!(DigestFunction::for_request(0, Some(hello)).unwrap(), inferred);
        assert_eq!(DigestFunction::for_request(f.proto_value(), Some(hello)).unwrap(), f);
    }
    assert_eq!(DigestFunction::for_request(0, None).unwrap(), DigestFunction::Sha256);
}

#[test]
fn equal_hashes_of_two_functions_are_different_digests() {
    let sha = Digest::parse_with(DigestFunction::Sha256, &format!("{HELLO}/6")).unwrap();
    let b3 = Digest::parse_with(DigestFunction::Blake3, &format!("{HELLO}/6")).unwrap();
    assert_eq!(sha.hash_hex(), b3.hash_hex());
    assert_ne!(sha, b3);
    let e = Digest::parse_with(DigestFunction::Sha1, &format!("{HELLO}/6")).unwrap_err();
    assert!(e.to_string().contains("sha1 needs 40"), "{e}");
}

#[test]
fn a_digest_packs_function_and_size_into_one_word() {
    assert_eq!(std::mem::size_of::<Digest>(), 72, "a mount holds two digests per listed file");
    for (i, f) in DigestFunction::ALL.into_iter().enumerate() {
        assert_eq!(f as usize, i, "ALL is in declaration order: the packed index depends on it");
        let d = Digest::new_with(f, &vec![0xab; f.hash_len()], MAX_SIZE).unwrap();
        assert_eq!((d.function(), d.size()), (f, MAX_SIZE));
    }
    let big = format!("{HELLO}/{}", MAX_SIZE + 1);
    let e = Digest::parse(&big).unwrap_err();
    assert!(e.to_string().contains("largest blob size"), "{e}");
    assert!(Digest::new_with(DigestFunction::Sha256, &[0; 32], u64::MAX).is_err());
}
