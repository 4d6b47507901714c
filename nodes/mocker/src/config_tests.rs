use super::*;

#[test]
fn defaults_are_valid() {
    assert_eq!(MockerConfig::default().validate(), Ok(()));
    assert!(MockerConfig::instant().is_instant());
    assert!(!MockerConfig::default().is_instant());
}

#[test]
fn every_problem_is_reported() {
    let config = MockerConfig {
        block_size: 0,
        max_batched_tokens: 0,
        speedup: -1.0,
        eos_probability: 2.0,
        vocab_size: 3,
        special_token_ids: vec![0, 1, 2, 2, 7],
        ..MockerConfig::default()
    };
    let errors = config.validate().unwrap_err();
    assert_eq!(
        errors,
        vec![
            ConfigError::Zero {
                field: "block_size"
            },
            ConfigError::Zero {
                field: "max_batched_tokens"
            },
            ConfigError::Speedup(-1.0),
            ConfigError::EosProbability(2.0),
            ConfigError::NoOrdinaryTokens {
                vocab_size: 3,
                special: 3
            },
        ]
    );
}

#[test]
fn absurd_sizes_are_rejected() {
    let config = MockerConfig {
        num_blocks: MAX_NUM_BLOCKS + 1,
        event_buffer: usize::MAX,
        ..MockerConfig::default()
    };
    let errors = config.validate().unwrap_err();
    assert_eq!(
        errors,
        vec![
            ConfigError::TooLarge {
                field: "num_blocks",
                value: MAX_NUM_BLOCKS + 1,
                max: MAX_NUM_BLOCKS
            },
            ConfigError::TooLarge {
                field: "event_buffer",
                value: usize::MAX,
                max: MAX_EVENT_BUFFER
            },
        ]
    );
}

#[test]
fn nan_speedup_is_rejected() {
    let config = MockerConfig {
        speedup: f64::NAN,
        ..MockerConfig::default()
    };
    assert!(matches!(
        config.validate().unwrap_err()[..],
        [ConfigError::Speedup(_)]
    ));
}

#[test]
fn deserializes_with_defaults_and_rejects_unknown_fields() {
    let config: MockerConfig =
        serde_json::from_str(r#"{"block_size": 64, "num_blocks": 10}"#).unwrap();
    assert_eq!(config.block_size, 64);
    assert_eq!(config.num_blocks, 10);
    assert_eq!(config.max_num_seqs, MockerConfig::default().max_num_seqs);
    let err = serde_json::from_str::<MockerConfig>(r#"{"blok_size": 64}"#).unwrap_err();
    assert!(err.to_string().contains("blok_size"), "{err}");
}

#[test]
fn instant_speedup_round_trips_through_json() {
    let json = serde_json::to_string(&MockerConfig::instant()).unwrap();
    assert!(json.contains(r#""speedup":"instant""#), "{json}");
    let back: MockerConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, MockerConfig::instant());
    let c: MockerConfig = serde_json::from_str(r#"{"speedup": 4}"#).unwrap();
    assert_eq!(c.speedup, 4.0);
    let err = serde_json::from_str::<MockerConfig>(r#"{"speedup": "fast"}"#).unwrap_err();
    assert!(err.to_string().contains("instant"), "{err}");
}

#[test]
fn kv_layout_follows_block_size_by_default() {
    let config = MockerConfig {
        block_size: 64,
        ..MockerConfig::default()
    };
    assert_eq!(config.validate(), Ok(()));
    let layout = config.layout();
    assert_eq!(layout.block_size, 64);
    assert_eq!(
        (layout.layers, layout.kv_heads, layout.head_dim),
        (30, 3, 64)
    );
    // SmolLM2-135M: 2 (K and V) x 30 x 3 x 64 x 2 bytes per token.
    assert_eq!(MockerConfig::default().layout().bytes_per_block(), 368_640);
    let explicit = MockerConfig {
        kv_layout: KvLayout {
            block_size: 16,
            ..SMOLLM2_135M_KV_LAYOUT
        },
        ..MockerConfig::default()
    };
    assert_eq!(explicit.validate(), Ok(()));
    assert_eq!(explicit.layout(), MockerConfig::default().layout());
}

#[test]
fn kv_layout_problems_are_reported() {
    let config = MockerConfig {
        block_size: 32,
        kv_layout: KvLayout {
            layers: 0,
            block_size: 16,
            ..SMOLLM2_135M_KV_LAYOUT
        },
        ..MockerConfig::default()
    };
    assert_eq!(
        config.validate(),
        Err(vec![
            ConfigError::LayoutBlockSize {
                layout: 16,
                block_size: 32
            },
            ConfigError::LayoutZero { field: "layers" },
        ])
    );
    // Sizes that would overflow are an error, not a panic.
    let huge = MockerConfig {
        kv_layout: KvLayout {
            layers: u32::MAX,
            kv_heads: u32::MAX,
            head_dim: u32::MAX,
            dtype_bytes: u32::MAX,
            block_size: 0,
        },
        ..MockerConfig::default()
    };
    assert_eq!(
        huge.validate(),
        Err(vec![ConfigError::LayoutTooLarge {
            bytes: u64::MAX,
            max: MAX_BLOCK_BYTES
        }])
    );
}

#[test]
fn kv_layout_deserializes() {
    let config: MockerConfig = serde_json::from_str(
        r#"{"block_size": 32, "kv_layout": {"layers": 2, "kv_heads": 1, "head_dim": 8, "dtype_bytes": 1, "block_size": 32}}"#,
    )
    .unwrap();
    assert_eq!(config.validate(), Ok(()));
    assert_eq!(config.layout().bytes_per_block(), 2 * 2 * 8 * 32);
}
