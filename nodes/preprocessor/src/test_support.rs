//! A tiny byte-level tokenizer for tests that must not need the real model: every byte
//! is one token (no merges) and three ChatML special tokens follow.

use std::path::PathBuf;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::preprocess::{ModelSource, PreprocessorConfig};

pub const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Writes the tokenizer.json once per test binary and returns its path.
pub fn tiny_tokenizer_json() -> PathBuf {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let vocab: Vocab = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .unwrap();
        let mut t = tokenizers::Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
            .with_decoder(Some(ByteLevelDecoder::default()));
        t.add_special_tokens(
            ["<|im_start|>", "<|im_end|>", "<|endoftext|>"].map(|s| AddedToken::from(s, true)),
        )
        .unwrap();
        let path = std::env::temp_dir().join(format!(
            "dynamo-preprocessor-tiny-tokenizer-{}.json",
            std::process::id()
        ));
        t.save(&path, false).unwrap();
        path
    })
    .clone()
}

pub fn tiny_config(context_length: u32) -> PreprocessorConfig {
    PreprocessorConfig {
        model: ModelSource::TokenizerJson {
            path: tiny_tokenizer_json(),
            bos_token: None,
            eos_token: Some("<|im_end|>".into()),
        },
        chat_template: Some(CHATML.into()),
        system_prompt: Some("Be nice.".into()),
        context_length: Some(context_length),
    }
}
