use super::*;

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
    }
}

const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

#[test]
fn renders_chatml_with_generation_prompt() {
    let t = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
    let out = t.render(&[msg("user", "Hi")]).unwrap();
    assert_eq!(
        out,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
}

#[test]
fn default_system_prompt_only_when_missing() {
    let t = ChatTemplate::new(CHATML, "", "")
        .unwrap()
        .with_default_system_prompt(Some("Be brief.".into()));
    let out = t.render(&[msg("user", "Hi")]).unwrap();
    assert!(
        out.starts_with("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"),
        "{out}"
    );
    let out = t
        .render(&[msg("system", "Own."), msg("user", "Hi")])
        .unwrap();
    assert!(!out.contains("Be brief."), "{out}");
    assert!(
        out.starts_with("<|im_start|>system\nOwn.<|im_end|>"),
        "{out}"
    );
}

#[test]
fn python_string_methods_and_special_tokens() {
    let src = "{{ bos_token }}{% for m in messages %}{% if m.content.startswith('/') %}CMD:{{ m.content[1:].strip().upper() }}{% else %}{{ m.content | trim }}{% endif %}{% endfor %}{{ eos_token }}";
    let t = ChatTemplate::new(src, "<s>", "</s>").unwrap();
    assert_eq!(
        t.render(&[msg("user", "/run  ")]).unwrap(),
        "<s>CMD:RUN</s>"
    );
    assert_eq!(t.render(&[msg("user", " x ")]).unwrap(), "<s>x</s>");
}

#[test]
fn raise_exception_reaches_the_caller() {
    let src = "{% if messages[0].role != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}ok";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let err = t.render(&[msg("user", "Hi")]).unwrap_err();
    assert!(
        err.to_string().contains("first message must be system"),
        "{err}"
    );
    assert_eq!(t.render(&[msg("system", "s")]).unwrap(), "ok");
}

#[test]
fn tojson_matches_python_json_dumps() {
    let src = "{{ {'b': 1, 'a': [1, 'x<y', none, true], 'é': {}} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(sort_keys=true) }}|{{ [1, {'k': 'v'}] | tojson(indent=2) }}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    let out = t.render(&[]).unwrap();
    // What Python prints for json.dumps(..., ensure_ascii=False) with these arguments.
    let expected = concat!(
        r#"{"b": 1, "a": [1, "x<y", null, true], "é": {}}"#,
        "|",
        r#"{"a": 2, "b": 1}"#,
        "|",
        "[\n  1,\n  {\n    \"k\": \"v\"\n  }\n]",
    );
    assert_eq!(out, expected);
}

#[test]
fn fromjson_parses() {
    let src = "{% set d = '{\"n\": [1, 2]}' | fromjson %}{{ d.n[1] }}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert_eq!(t.render(&[]).unwrap(), "2");
    let bad = ChatTemplate::new("{{ 'nope' | fromjson }}", "", "").unwrap();
    assert!(bad.render(&[]).is_err());
}

#[test]
fn trim_and_lstrip_blocks_like_transformers() {
    let src = "{% for m in messages %}\n    {% if true %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}";
    let t = ChatTemplate::new(src, "", "").unwrap();
    assert_eq!(
        t.render(&[msg("user", "a"), msg("user", "b")]).unwrap(),
        "[a]\n[b]\n"
    );
}

#[test]
fn syntax_errors_are_reported_at_construction() {
    let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
    assert!(matches!(err, TemplateError::Syntax(_)), "{err}");
}
