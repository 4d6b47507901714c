//! Tests against the real SmolLM2-135M-Instruct GGUF and golden files made by an
//! independent reference (llama.cpp for ids, Python jinja2 for the template); see
//! scripts/make-tokenizer-golden.py.

mod common;

use dynamo_preprocessor::detokenizer::Detokenizer;
use dynamo_preprocessor::gguf::{GgmlType, GgufError, GgufFile, GgufValue};
use dynamo_preprocessor::tokenizer::{Tokenizer, TokenizerError};
use dynamo_preprocessor::{Preprocessor, PreprocessorConfig};
use dynamo_protocol::{ChatMessage, ChatRequest, Prompt, SamplingOptions};
use std::path::PathBuf;

use common::model_or_skip;

fn golden(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|i| i.as_u64().expect("id") as u32)
        .collect()
}

#[test]
fn gguf_header_of_the_real_model() {
    let Some(path) = model_or_skip("gguf_header_of_the_real_model") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.str("general.architecture").unwrap(), "llama");
    assert_eq!(f.opt_u64("llama.block_count").unwrap(), Some(30));
    assert_eq!(f.opt_u64("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(f.str("tokenizer.ggml.pre").unwrap(), "smollm");
    assert_eq!(f.str_array("tokenizer.ggml.tokens").unwrap().len(), 49152);
    // 30 layers × 7 linear (Q4_1) + the Q8_0 embedding + 61 F32 norms.
    assert_eq!(f.tensors.len(), 272);
    let count = |t: GgmlType| f.tensors.iter().filter(|i| i.ggml_type == t).count();
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::F32), 61);
    let embd = f
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .unwrap();
    assert_eq!(
        (embd.dims.as_slice(), embd.ggml_type),
        (&[576, 49152][..], GgmlType::Q8_0)
    );
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(f.data_offset % f.alignment, 0);
    assert!(f.tensors.iter().all(|t| f.data_offset + t.offset < len));
}

#[test]
fn truncated_real_header_is_an_error() {
    let Some(path) = model_or_skip("truncated_real_header_is_an_error") else {
        return;
    };
    let bytes = std::fs::read(&path).unwrap();
    let header_len = GgufFile::from_bytes(&bytes).unwrap().data_offset as usize;
    for n in [0, 3, 8, 23, 24, 1000, header_len / 2, header_len - 300] {
        let err = GgufFile::from_bytes(&bytes[..n]).unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. } | GgufError::TooLarge { .. }
            ),
            "{n}: {err}"
        );
    }
}

#[test]
fn tokenizer_matches_llama_cpp_golden() {
    let Some(path) = model_or_skip("tokenizer_matches_llama_cpp_golden") else {
        return;
    };
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let g = golden("tokenizer_golden.json");
    let cases = g["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "golden has {} cases", cases.len());
    let mut failures = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want = ids_of(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        if got != want {
            failures.push(format!("{text:?}\n   ours: {got:?}\n  llama: {want:?}"));
        }
        // Decoding with special tokens kept gives the text back exactly.
        assert_eq!(tok.decode(&got, false).unwrap(), text);
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn streaming_detokenization_matches_full_decode() {
    let Some(path) = model_or_skip("streaming_detokenization_matches_full_decode") else {
        return;
    };
    let tok = Tokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    for case in golden("tokenizer_golden.json")["cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        let mut d = Detokenizer::new();
        let mut chunks: Vec<String> = ids.iter().map(|&i| d.push(&tok, &[i]).unwrap()).collect();
        chunks.push(d.flush(&tok).unwrap());
        assert_eq!(chunks.concat(), tok.decode(&ids, true).unwrap(), "{case}");
        assert!(
            chunks.iter().all(|c| !c.contains('\u{FFFD}')),
            "split character: {chunks:?}"
        );
    }
}

#[test]
fn chat_template_matches_jinja2_golden() {
    let Some(path) = model_or_skip("chat_template_matches_jinja2_golden") else {
        return;
    };
    let g = golden("chat_template_golden.json");
    let mut config = PreprocessorConfig::gguf(path);
    config.system_prompt = Some(g["system_prompt"].as_str().unwrap().to_string());
    let pre = Preprocessor::new(config).unwrap();
    for conv in g["conversations"].as_array().unwrap() {
        let messages: Vec<ChatMessage> = serde_json::from_value(conv["messages"].clone()).unwrap();
        assert_eq!(
            pre.render(&messages).unwrap(),
            conv["rendered"].as_str().unwrap()
        );
        let req = ChatRequest {
            model: "smollm2".into(),
            prompt: Prompt::Chat(messages),
            sampling: SamplingOptions::default(),
            max_tokens: None,
            stop: vec![],
            ignore_eos: false,
        };
        let t = pre.preprocess(&req).unwrap();
        assert_eq!(t.token_ids, ids_of(&conv["ids"]));
        assert_eq!(
            t.stop.max_tokens as usize,
            pre.context_length() as usize - t.token_ids.len()
        );
    }
}

#[test]
fn smollm2_limits_and_stop_ids() {
    let Some(path) = model_or_skip("smollm2_limits_and_stop_ids") else {
        return;
    };
    let pre = Preprocessor::new(PreprocessorConfig::gguf(path)).unwrap();
    let tok = pre.tokenizer();
    assert_eq!(tok.eos().map(|t| t.text.as_str()), Some("<|im_end|>"));
    assert_eq!(tok.bos().map(|t| t.text.as_str()), Some("<|im_start|>"));
    let mut want = vec![
        tok.token_to_id("<|im_end|>").unwrap(),
        tok.token_to_id("<|endoftext|>").unwrap(),
    ];
    want.sort_unstable();
    assert_eq!(pre.stop_token_ids(), want);
    assert_eq!(pre.context_length(), 8192);
}

#[test]
fn unsupported_pre_tokenizer_is_named() {
    let Some(path) = model_or_skip("unsupported_pre_tokenizer_is_named") else {
        return;
    };
    let mut f = GgufFile::open(&path).unwrap();
    f.metadata.insert(
        "tokenizer.ggml.pre".into(),
        GgufValue::String("qwen2".into()),
    );
    let err = Tokenizer::from_gguf(&f).unwrap_err();
    assert!(
        matches!(err, TokenizerError::UnsupportedPre(ref p) if p == "qwen2"),
        "{err}"
    );
    assert!(err.to_string().contains("qwen2"));
}

#[test]
fn the_byte_table_decodes_exactly_like_the_tokenizer() {
    let Some(path) = model_or_skip("the_byte_table_decodes_exactly_like_the_tokenizer") else {
        return;
    };
    let f = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&f).unwrap();
    let vocab = tok.vocab_size() as u32;
    // Every id alone, including special tokens (skipped) and byte tokens (U+FFFD alone).
    for id in 0..vocab {
        let fast = tok.decode_bytes(&[id]).expect("SmolLM2 is byte-level");
        assert_eq!(fast, tok.decode(&[id], true).unwrap(), "id {id}");
    }
    // Windows of consecutive ids: multi-byte characters split across tokens.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let n = 1 + (x % 6) as usize;
        let ids: Vec<u32> = (0..n)
            .map(|i| ((x >> (i * 10)) % u64::from(vocab)) as u32)
            .collect();
        assert_eq!(
            tok.decode_bytes(&ids).unwrap(),
            tok.decode(&ids, true).unwrap(),
            "{ids:?}"
        );
    }
    let golden = golden("tokenizer_golden.json");
    for case in golden["cases"].as_array().unwrap() {
        let ids = ids_of(&case["ids"]);
        assert_eq!(
            tok.decode_bytes(&ids).unwrap(),
            tok.decode(&ids, true).unwrap()
        );
    }
}
