use dynamo_protocol::SamplingOptions;
use dynamo_runtime::ErrorKind;

use super::*;
use crate::test_support::tiny_config;

fn chat(messages: &[(&str, &str)], max_tokens: Option<u32>) -> ChatRequest {
    ChatRequest {
        model: "tiny".into(),
        prompt: Prompt::Chat(
            messages
                .iter()
                .map(|(r, c)| ChatMessage {
                    role: r.to_string(),
                    content: c.to_string(),
                })
                .collect(),
        ),
        sampling: SamplingOptions::default(),
        max_tokens,
        stop: Vec::new(),
        ignore_eos: false,
    }
}

fn tiny(context: u32) -> Preprocessor {
    Preprocessor::new(tiny_config(context)).unwrap()
}

#[test]
fn chat_is_rendered_with_default_system_prompt_and_tokenized() {
    let p = tiny(1000);
    let req = chat(&[("user", "Hi")], Some(5));
    let t = p.preprocess(&req).unwrap();
    let text = "<|im_start|>system\nBe nice.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n";
    assert_eq!(t.token_ids, p.tokenizer().encode(text, false).unwrap());
    assert_eq!(p.tokenizer().decode(&t.token_ids, false).unwrap(), text);
    let start = p.tokenizer().token_to_id("<|im_start|>").unwrap();
    assert_eq!(t.token_ids.iter().filter(|&&i| i == start).count(), 3);
    assert_eq!(t.stop.max_tokens, 5);
    assert_eq!(t.model, "tiny");
}

#[test]
fn stop_ids_are_eos_and_end_of_turn_tokens() {
    let p = tiny(1000);
    let mut expected = vec![
        p.tokenizer().token_to_id("<|im_end|>").unwrap(),
        p.tokenizer().token_to_id("<|endoftext|>").unwrap(),
    ];
    expected.sort_unstable();
    assert_eq!(p.stop_token_ids(), expected);
    let t = p.preprocess(&chat(&[("user", "Hi")], None)).unwrap();
    assert_eq!(t.stop.stop_token_ids, expected);
}

#[test]
fn max_tokens_defaults_to_the_rest_of_the_context() {
    let p = tiny(1000);
    let t = p.preprocess(&chat(&[("user", "Hi")], None)).unwrap();
    assert_eq!(t.stop.max_tokens as usize, 1000 - t.token_ids.len());
}

#[test]
fn bad_requests_are_rejected_with_reasons() {
    let p = tiny(60);
    let err = p.preprocess(&chat(&[], None)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    assert!(err.message.contains("empty"), "{}", err.message);

    let long = "x".repeat(100);
    let err = p.preprocess(&chat(&[("user", &long)], None)).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    assert!(
        err.message.contains("context is 60 tokens"),
        "{}",
        err.message
    );

    let n = p
        .preprocess(&chat(&[("user", "Hi")], None))
        .unwrap()
        .token_ids
        .len();
    let err = p
        .preprocess(&chat(&[("user", "Hi")], Some(61 - n as u32)))
        .unwrap_err();
    assert!(err.message.contains("lower max_tokens"), "{}", err.message);
    assert!(p
        .preprocess(&chat(&[("user", "Hi")], Some(60 - n as u32)))
        .is_ok());
    let err = p.preprocess(&chat(&[("user", "Hi")], Some(0))).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
}

#[test]
fn text_and_token_prompts() {
    let p = tiny(1000);
    let mut req = chat(&[], None);
    req.prompt = Prompt::Text("ab".into());
    assert_eq!(p.preprocess(&req).unwrap().token_ids.len(), 2);
    req.prompt = Prompt::Tokens(vec![3, 4]);
    assert_eq!(p.preprocess(&req).unwrap().token_ids, vec![3, 4]);
    req.prompt = Prompt::Tokens(vec![3, 1_000_000]);
    let err = p.preprocess(&req).unwrap_err();
    assert!(err.message.contains("1000000"), "{}", err.message);
    req.prompt = Prompt::Tokens(vec![]);
    assert_eq!(
        p.preprocess(&req).unwrap_err().kind,
        ErrorKind::InvalidRequest
    );
}

#[test]
fn template_exceptions_are_invalid_requests() {
    let mut config = tiny_config(1000);
    config.chat_template =
        Some("{% if messages[-1].role != 'user' %}{{ raise_exception('last must be user') }}{% endif %}x".into());
    let p = Preprocessor::new(config).unwrap();
    let err = p
        .preprocess(&chat(&[("assistant", "a")], None))
        .unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidRequest);
    assert!(err.message.contains("last must be user"), "{}", err.message);
}

#[test]
fn config_errors() {
    let mut config = tiny_config(1000);
    config.chat_template = None;
    assert!(matches!(
        Preprocessor::new(config),
        Err(PreprocessorError::MissingChatTemplate)
    ));
    let mut config = tiny_config(1000);
    config.context_length = None;
    assert!(matches!(
        Preprocessor::new(config),
        Err(PreprocessorError::MissingContextLength)
    ));
    let err = Preprocessor::new(PreprocessorConfig::gguf("/nonexistent.gguf")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent.gguf"), "{err}");
}
