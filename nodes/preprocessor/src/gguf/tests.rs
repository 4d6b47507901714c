use super::*;

/// A minimal GGUF writer, enough to produce valid and broken files for the reader.
#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
        self
    }
    fn header(&mut self, version: u32, n_tensors: u64, n_kv: u64) -> &mut Self {
        self.0.extend_from_slice(b"GGUF");
        self.u32(version).u64(n_tensors).u64(n_kv)
    }
}

/// A file with one key of every value type, an array of strings, a nested array and
/// two tensors.
fn sample() -> Vec<u8> {
    let mut w = Writer::default();
    w.header(3, 2, 15);
    w.str("a.u8").u32(0).0.push(200);
    w.str("a.i8").u32(1).0.push(0xff);
    w.str("a.u16")
        .u32(2)
        .0
        .extend_from_slice(&513u16.to_le_bytes());
    w.str("a.i16")
        .u32(3)
        .0
        .extend_from_slice(&(-2i16).to_le_bytes());
    w.str("a.u32").u32(4).u32(70_000);
    w.str("a.i32")
        .u32(5)
        .0
        .extend_from_slice(&(-5i32).to_le_bytes());
    w.str("a.f32")
        .u32(6)
        .0
        .extend_from_slice(&1.5f32.to_le_bytes());
    w.str("a.bool").u32(7).0.push(1);
    w.str("a.string").u32(8).str("héllo");
    w.str("a.u64").u32(10).u64(1 << 40);
    w.str("a.i64")
        .u32(11)
        .0
        .extend_from_slice(&(-7i64).to_le_bytes());
    w.str("a.f64")
        .u32(12)
        .0
        .extend_from_slice(&2.25f64.to_le_bytes());
    w.str("tokens")
        .u32(9)
        .u32(8)
        .u64(3)
        .str("a")
        .str("")
        .str("<|im_end|>");
    // An array of two arrays of i32.
    w.str("nested").u32(9).u32(9).u64(2);
    w.u32(5).u64(1).u32(7);
    w.u32(5).u64(0);
    w.str("general.alignment").u32(4).u32(64);
    w.str("tok_embd.weight")
        .u32(2)
        .u64(576)
        .u64(49152)
        .u32(8)
        .u64(0);
    w.str("norm.weight").u32(1).u64(576).u32(0).u64(1024);
    w.0
}

#[test]
fn reads_every_value_type_and_tensor_infos() {
    let bytes = sample();
    let f = GgufFile::from_bytes(&bytes).expect("valid sample");
    assert_eq!(f.version, 3);
    assert_eq!(f.metadata.len(), 15);
    assert_eq!(f.get("a.u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("a.i8"), Some(&GgufValue::I8(-1)));
    assert_eq!(f.get("a.u16"), Some(&GgufValue::U16(513)));
    assert_eq!(f.get("a.i16"), Some(&GgufValue::I16(-2)));
    assert_eq!(f.opt_u64("a.u32").unwrap(), Some(70_000));
    assert_eq!(f.get("a.i32"), Some(&GgufValue::I32(-5)));
    assert_eq!(f.get("a.f32"), Some(&GgufValue::F32(1.5)));
    assert_eq!(f.opt_bool("a.bool").unwrap(), Some(true));
    assert_eq!(f.str("a.string").unwrap(), "héllo");
    assert_eq!(f.opt_u64("a.u64").unwrap(), Some(1 << 40));
    assert_eq!(f.get("a.i64"), Some(&GgufValue::I64(-7)));
    assert_eq!(f.get("a.f64"), Some(&GgufValue::F64(2.25)));
    assert_eq!(f.str_array("tokens").unwrap(), vec!["a", "", "<|im_end|>"]);
    let nested = f.get("nested").and_then(GgufValue::as_array).unwrap();
    assert_eq!(nested[0].as_array().unwrap(), &[GgufValue::I32(7)]);
    assert!(nested[1].as_array().unwrap().is_empty());
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert!(f.data_offset >= bytes.len() as u64);
    assert!(f.data_offset < bytes.len() as u64 + 64);
    assert_eq!(f.tensors.len(), 2);
    assert_eq!(f.tensors[0].name, "tok_embd.weight");
    assert_eq!(f.tensors[0].dims, vec![576, 49152]);
    assert_eq!(f.tensors[0].ggml_type, GgmlType::Q8_0);
    assert_eq!(f.tensors[1].ggml_type, GgmlType::F32);
    assert_eq!(f.tensors[1].offset, 1024);
}

#[test]
fn typed_getters_report_missing_and_wrong_types() {
    let f = GgufFile::from_bytes(&sample()).unwrap();
    assert!(matches!(f.str("nope"), Err(GgufError::MissingKey(k)) if k == "nope"));
    assert!(matches!(
        f.str("a.u32"),
        Err(GgufError::WrongType {
            expected: "string",
            found: "u32",
            ..
        })
    ));
    assert!(matches!(
        f.opt_u64("a.i8"),
        Err(GgufError::WrongType { .. })
    ));
    assert!(matches!(
        f.str_array("nested"),
        Err(GgufError::WrongType { .. })
    ));
    assert_eq!(f.opt_str("nope").unwrap(), None);
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let bytes = sample();
    // The header ends where the last tensor info ends; the file has no data section.
    for n in 0..bytes.len() {
        let err = GgufFile::from_bytes(&bytes[..n]).expect_err("truncated file must fail");
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. } | GgufError::TooLarge { .. }
            ),
            "prefix {n}: unexpected {err}"
        );
    }
}

#[test]
fn garbage_is_rejected() {
    assert!(matches!(
        GgufFile::from_bytes(b"PK\x03\x04 not a gguf"),
        Err(GgufError::BadMagic { .. })
    ));
    let mut w = Writer::default();
    w.header(1, 0, 0);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::UnsupportedVersion(1))
    ));
    // Deterministic pseudo-random bytes after a valid magic and version: never a panic.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..2000 {
        let mut w = Writer::default();
        w.0.extend_from_slice(b"GGUF");
        w.u32(3);
        for _ in 0..64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // Small numbers are more interesting than uniform u64s.
            let b = (state % 16) as u8;
            w.0.push(if state & 0x100 == 0 { b } else { state as u8 });
        }
        let _ = GgufFile::from_bytes(&w.0);
    }
}

#[test]
fn absurd_lengths_do_not_allocate() {
    let mut w = Writer::default();
    w.header(3, 0, 1).str("k").u32(8).u64(u64::MAX);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::TooLarge { .. })
    ));
    let mut w = Writer::default();
    w.header(3, 0, 1).str("k").u32(9).u32(10).u64(1 << 60);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::TooLarge { .. })
    ));
    let mut w = Writer::default();
    w.header(3, u64::MAX, 0);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::TooLarge { .. })
    ));
}

#[test]
fn bad_values_are_named() {
    let mut w = Writer::default();
    w.header(3, 0, 1).str("k").u32(13);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::UnknownValueType(13))
    ));
    let mut w = Writer::default();
    w.header(3, 0, 1).str("k").u32(8).u64(2);
    w.0.extend_from_slice(&[0xff, 0xfe]);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::InvalidUtf8 { .. })
    ));
    let mut w = Writer::default();
    w.header(3, 0, 2)
        .str("k")
        .u32(4)
        .u32(1)
        .str("k")
        .u32(4)
        .u32(2);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::DuplicateKey(_))
    ));
    let mut w = Writer::default();
    w.header(3, 0, 1).str("general.alignment").u32(4).u32(24);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::BadAlignment(24))
    ));
    let mut w = Writer::default();
    w.header(3, 1, 0).str("t").u32(5);
    w.0.extend_from_slice(&[0; 64]);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::TooManyDims { n_dims: 5, .. })
    ));
    // Arrays nested 100 deep: rejected by depth, not by the stack.
    let mut w = Writer::default();
    w.header(3, 0, 1).str("k").u32(9);
    for _ in 0..100 {
        w.u32(9).u64(1);
    }
    w.0.extend_from_slice(&[0; 64]);
    assert!(matches!(
        GgufFile::from_bytes(&w.0),
        Err(GgufError::TooDeep)
    ));
}

#[test]
fn missing_file_names_the_path() {
    let err = GgufFile::open(Path::new("/nonexistent/model.gguf")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/model.gguf"), "{err}");
}
