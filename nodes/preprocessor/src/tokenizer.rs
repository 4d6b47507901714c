//! The model's tokenizer: a Hugging Face [`tokenizers::Tokenizer`] built from GGUF
//! metadata (the way llama.cpp reads it) or loaded from a `tokenizer.json`.
//!
//! GGUF only names its pre-tokenizer (`tokenizer.ggml.pre`); what each name means lives
//! in llama.cpp's `llama-vocab.cpp`, so we keep our own table ([`pre_tokenizer_for`]) and
//! refuse names we have not checked against llama.cpp's ids rather than guess.

use std::path::{Path, PathBuf};

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::gguf::{GgufError, GgufFile};

/// llama.cpp's token type for control tokens (`<|im_start|>`, `<|endoftext|>`, ...).
const TOKEN_TYPE_CONTROL: i64 = 3;
/// llama.cpp's token type for user-defined tokens: matched in text, but not special.
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error("unsupported GGUF tokenizer model {0:?} (supported: \"gpt2\", byte-level BPE)")]
    UnsupportedModel(String),
    #[error(
        "unsupported GGUF pre-tokenizer tokenizer.ggml.pre = {0:?} (supported: \"smollm\", \"gpt-2\"); \
         use a tokenizer.json for this model"
    )]
    UnsupportedPre(String),
    #[error("GGUF merge #{index} {merge:?} is not two tokens separated by a space")]
    BadMerge { index: usize, merge: String },
    #[error("GGUF token #{index} {token:?} appears twice in the vocabulary")]
    DuplicateToken { index: usize, token: String },
    #[error("GGUF {key} = {id} is outside the vocabulary of {vocab_size} tokens")]
    BadTokenId {
        key: String,
        id: u64,
        vocab_size: usize,
    },
    #[error("GGUF tokenizer.ggml.token_type has {types} entries for {tokens} tokens")]
    TokenTypeLength { types: usize, tokens: usize },
    #[error("cannot build the tokenizer: {0}")]
    Build(#[source] tokenizers::Error),
    #[error("cannot load tokenizer {path}: {source}")]
    Load {
        path: PathBuf,
        #[source]
        source: tokenizers::Error,
    },
    #[error("token {token:?} is not in the vocabulary of {path}")]
    UnknownToken { path: PathBuf, token: String },
    #[error("cannot encode text: {0}")]
    Encode(#[source] tokenizers::Error),
    #[error("cannot decode token ids: {0}")]
    Decode(#[source] tokenizers::Error),
}

/// A special token by id and text, e.g. the end-of-sequence token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialToken {
    pub id: u32,
    pub text: String,
}

/// A tokenizer with the special tokens the preprocessor needs to know about.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// The fast decoding path of byte-level BPE vocabularies (GGUF `gpt2` models).
    bytes: Option<crate::byte_table::ByteTable>,
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
    /// Prepend `bos` when encoding with special tokens (GGUF `add_bos_token`).
    add_bos: bool,
}

/// The pre-tokenizer llama.cpp uses for a `tokenizer.ggml.pre` value, for byte-level BPE.
pub fn pre_tokenizer_for(pre: &str) -> Result<PreTokenizerWrapper, TokenizerError> {
    // GPT-2's regex, no prefix space: what llama.cpp does for these names.
    let byte_level = || ByteLevel::new(false, true, true).into();
    match pre {
        // llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM: "\p{N}" (single digits), then GPT-2's regex.
        "smollm" => Ok(Sequence::new(vec![Digits::new(true).into(), byte_level()]).into()),
        "gpt-2" => Ok(byte_level()),
        other => Err(TokenizerError::UnsupportedPre(other.to_string())),
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self, TokenizerError> {
        let model = gguf.str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_string()));
        }
        // Check the pre-tokenizer before the expensive part.
        // A file without the key gets llama.cpp's "default" pre-tokenizer, which is not
        // GPT-2's regex; refusing it beats guessing.
        let pre = pre_tokenizer_for(gguf.opt_str("tokenizer.ggml.pre")?.unwrap_or("default"))?;
        let tokens = gguf.str_array("tokenizer.ggml.tokens")?;
        let mut vocab = Vocab::with_capacity(tokens.len());
        for (index, token) in tokens.iter().enumerate() {
            let id = u32::try_from(index).map_err(|_| TokenizerError::BadTokenId {
                key: "tokenizer.ggml.tokens".into(),
                id: index as u64,
                vocab_size: tokens.len(),
            })?;
            if vocab.insert((*token).to_string(), id).is_some() {
                return Err(TokenizerError::DuplicateToken {
                    index,
                    token: (*token).to_string(),
                });
            }
        }
        let merges = gguf
            .str_array("tokenizer.ggml.merges")?
            .into_iter()
            .enumerate()
            .map(|(index, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| TokenizerError::BadMerge {
                        index,
                        merge: m.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(TokenizerError::Build)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner
            .with_pre_tokenizer(Some(pre))
            .with_decoder(Some(ByteLevelDecoder::default()));

        // Control tokens are special (split out of text, skipped when decoding);
        // user-defined ones are matched in text but decoded as text.
        if let Some(types) = gguf.opt_int_array("tokenizer.ggml.token_type")? {
            if types.len() != tokens.len() {
                return Err(TokenizerError::TokenTypeLength {
                    types: types.len(),
                    tokens: tokens.len(),
                });
            }
            let of_type = |t: i64, special: bool| -> Vec<AddedToken> {
                tokens
                    .iter()
                    .zip(&types)
                    .filter(|(_, ty)| **ty == t)
                    .map(|(tok, _)| AddedToken::from((*tok).to_string(), special))
                    .collect()
            };
            inner
                .add_special_tokens(of_type(TOKEN_TYPE_CONTROL, true))
                .map_err(TokenizerError::Build)?;
            inner
                .add_tokens(of_type(TOKEN_TYPE_USER_DEFINED, false))
                .map_err(TokenizerError::Build)?;
        }

        let special = |key: &str| -> Result<Option<SpecialToken>, TokenizerError> {
            let Some(id) = gguf.opt_u64(key)? else {
                return Ok(None);
            };
            let bad = || TokenizerError::BadTokenId {
                key: key.to_string(),
                id,
                vocab_size: tokens.len(),
            };
            let index = usize::try_from(id).map_err(|_| bad())?;
            let text = tokens.get(index).ok_or_else(bad)?;
            Ok(Some(SpecialToken {
                id: index as u32,
                text: (*text).to_string(),
            }))
        };
        let bos = special("tokenizer.ggml.bos_token_id")?;
        let eos = special("tokenizer.ggml.eos_token_id")?;
        let add_bos = gguf
            .opt_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false)
            && bos.is_some();
        let added = inner.get_added_tokens_decoder();
        let special: Vec<u32> = added
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect();
        let literal: Vec<u32> = added
            .iter()
            .filter(|(_, t)| !t.special)
            .map(|(id, _)| *id)
            .collect();
        let bytes = crate::byte_table::ByteTable::new(&tokens, &special, &literal);
        Ok(Tokenizer {
            inner,
            bytes,
            bos,
            eos,
            add_bos,
        })
    }

    /// Loads a `tokenizer.json`; `bos` / `eos` name the model's special tokens, which
    /// `tokenizer.json` does not record (they live in `tokenizer_config.json`).
    pub fn from_json_file(
        path: &Path,
        bos: Option<&str>,
        eos: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_file(path).map_err(|source| TokenizerError::Load {
                path: path.to_path_buf(),
                source,
            })?;
        let lookup = |token: Option<&str>| -> Result<Option<SpecialToken>, TokenizerError> {
            token
                .map(|t| {
                    inner
                        .token_to_id(t)
                        .map(|id| SpecialToken {
                            id,
                            text: t.to_string(),
                        })
                        .ok_or_else(|| TokenizerError::UnknownToken {
                            path: path.to_path_buf(),
                            token: t.to_string(),
                        })
                })
                .transpose()
        };
        let bos = lookup(bos)?;
        let eos = lookup(eos)?;
        // tokenizer.json's own post-processor adds what the model wants.
        Ok(Tokenizer {
            inner,
            bytes: None,
            bos,
            eos,
            add_bos: false,
        })
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are
    /// always recognised; `add_special_tokens` adds the model's BOS / post-processing,
    /// which a rendered chat template already contains.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(TokenizerError::Encode)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if add_special_tokens && self.add_bos {
            if let Some(bos) = &self.bos {
                ids.push(bos.id);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Text of `ids` skipping special tokens, through the byte table when the vocabulary
    /// is byte-level (same result as [`Tokenizer::decode`], much cheaper); `None` otherwise.
    pub fn decode_bytes(&self, ids: &[u32]) -> Option<String> {
        self.bytes.as_ref()?.decode(ids)
    }

    /// Text of `ids`, skipping special tokens. Incomplete UTF-8 at the end comes out as
    /// U+FFFD; use [`crate::detokenizer::Detokenizer`] for streams.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(TokenizerError::Decode)
    }

    /// The bytes one token stands for (a special token: its own text), as OpenAI's
    /// `logprobs` report it; empty for an unknown id.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        if let Some(b) = self.bytes.as_ref().and_then(|t| t.token_bytes(id)) {
            return b.to_vec();
        }
        match self.decode(&[id], false) {
            Ok(text) if !text.is_empty() => text.into_bytes(),
            _ => self.id_to_token(id).unwrap_or_default().into_bytes(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos(&self) -> Option<&SpecialToken> {
        self.bos.as_ref()
    }

    pub fn eos(&self) -> Option<&SpecialToken> {
        self.eos.as_ref()
    }

    /// The underlying Hugging Face tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let err = pre_tokenizer_for("qwen2").unwrap_err();
        assert!(err.to_string().contains("\"qwen2\""), "{err}");
        assert!(pre_tokenizer_for("smollm").is_ok());
    }

    #[test]
    fn missing_json_file_is_an_error() {
        let err = Tokenizer::from_json_file(Path::new("/nonexistent/tokenizer.json"), None, None)
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/tokenizer.json"),
            "{err}"
        );
    }
}
