//! A reader for the header of a GGUF file (versions 2 and 3): metadata key/values and
//! tensor infos. The tensor data itself is not read; [`GgufFile::data_offset`] says where
//! it starts, so an engine can map it.
//!
//! Every length read from the file is checked against the bytes that are left before
//! anything is allocated, so a truncated or garbage file gives a [`GgufError`], never a
//! panic or a huge allocation.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

mod reader;
mod value;

use reader::Reader;
pub use value::{GgmlType, GgufType, GgufValue};

const MAGIC: [u8; 4] = *b"GGUF";
/// GGML's limit on tensor dimensions.
const MAX_DIMS: u32 = 4;
/// Arrays of arrays deeper than this are rejected (they would only recurse the stack).
const MAX_ARRAY_DEPTH: u32 = 8;
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("cannot read GGUF file {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("I/O error while reading GGUF {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("not a GGUF file: magic is {found:02x?}, expected \"GGUF\"")]
    BadMagic { found: [u8; 4] },
    #[error("unsupported GGUF version {0} (supported: 2 and 3, little-endian)")]
    UnsupportedVersion(u32),
    #[error("GGUF file is truncated while reading {what}")]
    Truncated { what: &'static str },
    #[error("GGUF {what} is not valid UTF-8")]
    InvalidUtf8 { what: &'static str },
    #[error("unknown GGUF metadata value type {0}")]
    UnknownValueType(u32),
    #[error("GGUF {what} of {len} exceeds the {left} bytes left in the file")]
    TooLarge {
        what: &'static str,
        len: u64,
        left: u64,
    },
    #[error("tensor {name:?} has {n_dims} dimensions, GGML allows at most {MAX_DIMS}")]
    TooManyDims { name: String, n_dims: u32 },
    #[error("GGUF metadata arrays are nested deeper than {MAX_ARRAY_DEPTH}")]
    TooDeep,
    #[error("duplicate GGUF metadata key {0:?}")]
    DuplicateKey(String),
    #[error("GGUF metadata key {0:?} is missing")]
    MissingKey(String),
    #[error("GGUF metadata key {key:?} has type {found}, expected {expected}")]
    WrongType {
        key: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("GGUF general.alignment must be a non-zero power of two, got {0}")]
    BadAlignment(u64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions as GGUF stores them: the first one is the fastest-varying.
    pub dims: Vec<u64>,
    pub ggml_type: GgmlType,
    /// Offset of the tensor's data from [`GgufFile::data_offset`].
    pub offset: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    pub version: u32,
    /// Metadata in key order (keys are unique).
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    pub alignment: u64,
    /// Absolute file offset where the tensor data starts (aligned).
    pub data_offset: u64,
}

impl GgufFile {
    /// Reads the header of the file at `path`; the tensor data is not read.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let open_err = |source| GgufError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        Self::read(BufReader::with_capacity(1 << 20, file), len)
    }

    /// Reads a header from memory (the whole file or at least its header part).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, GgufError> {
        Self::read(bytes, bytes.len() as u64)
    }

    /// Reads a header from `reader`, which holds `len` bytes in all.
    pub fn read<R: Read>(reader: R, len: u64) -> Result<Self, GgufError> {
        let mut r = Reader {
            inner: reader,
            pos: 0,
            len,
        };
        let mut magic = [0u8; 4];
        r.fill(&mut magic, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = r.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata count")?;
        // Each key/value needs at least a key length, a type and a byte.
        r.check_len("metadata count", n_kv, 13)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = GgufType::from_u32(r.u32("metadata value type")?)?;
            let value = r.value(ty, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(GgufError::DuplicateKey(key));
            }
        }
        // Name length, dimension count, one dimension, type, offset.
        r.check_len("tensor count", n_tensors, 32)?;
        let mut tensors = Vec::with_capacity(usize::try_from(n_tensors).unwrap_or(0));
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor dimension count")?;
            if n_dims > MAX_DIMS {
                return Err(GgufError::TooManyDims { name, n_dims });
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dimension")?);
            }
            let ggml_type = GgmlType::from_u32(r.u32("tensor type")?);
            let offset = r.u64("tensor offset")?;
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
            });
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => {
                let a = v.as_u64().unwrap_or(0);
                if a == 0 || !a.is_power_of_two() {
                    return Err(GgufError::BadAlignment(a));
                }
                a
            }
        };
        let data_offset = r.pos.div_ceil(alignment).saturating_mul(alignment);
        Ok(GgufFile {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, GgufError> {
        self.get(key)
            .ok_or_else(|| GgufError::MissingKey(key.to_string()))
    }

    fn wrong(key: &str, expected: &'static str, found: &GgufValue) -> GgufError {
        GgufError::WrongType {
            key: key.to_string(),
            expected,
            found: found.type_name(),
        }
    }

    /// A required string value.
    pub fn str(&self, key: &str) -> Result<&str, GgufError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, "string", v))
    }

    /// An optional string value (present with another type is an error).
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        self.get(key).map(|_| self.str(key)).transpose()
    }

    /// An optional non-negative integer of any width.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "non-negative integer", v)),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "bool", v)),
        }
    }

    /// A required array of strings.
    pub fn str_array(&self, key: &str) -> Result<Vec<&str>, GgufError> {
        let v = self.require(key)?;
        let items = v.as_array().ok_or_else(|| Self::wrong(key, "array", v))?;
        items
            .iter()
            .map(|i| {
                i.as_str()
                    .ok_or_else(|| Self::wrong(key, "array of string", i))
            })
            .collect()
    }

    /// An optional array of integers of any width.
    pub fn opt_int_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let items = v.as_array().ok_or_else(|| Self::wrong(key, "array", v))?;
        items
            .iter()
            .map(|i| {
                i.as_i64()
                    .ok_or_else(|| Self::wrong(key, "array of integer", i))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests;
