use super::*;

fn format(v_trans: bool) -> StateFormat {
    StateFormat {
        layers: 3,
        v_trans,
        n_rot_k: 0,
        n_rot_v: 0,
        k_type: 1,
        v_type: 1,
        k_row: 8,
        v_row: 8,
        v_elem: if v_trans { 2 } else { 0 },
    }
}

/// The byte of layer `l`, position `pos`, keys (`kv` 0) or values (1), byte `b` of the row.
fn byte(l: usize, pos: usize, kv: usize, b: usize) -> u8 {
    (l * 61 + pos * 7 + kv * 31 + b * 3) as u8
}

/// llama.cpp's writer, written out independently: cells in the given cache order.
fn llama_state(f: &StateFormat, order: &[usize]) -> Vec<u8> {
    let mut out = Vec::new();
    let p = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    p(&mut out, 0xaf14_3cd8);
    p(&mut out, 5);
    p(&mut out, 1);
    p(&mut out, order.len() as u32);
    for &pos in order {
        p(&mut out, pos as u32);
        p(&mut out, 1);
        p(&mut out, 5); // the source sequence's id: ignored
    }
    p(&mut out, u32::from(f.v_trans));
    p(&mut out, f.layers as u32);
    p(&mut out, 0);
    p(&mut out, 0);
    for l in 0..f.layers {
        p(&mut out, f.k_type as u32);
        out.extend_from_slice(&(f.k_row as u64).to_le_bytes());
        for &pos in order {
            out.extend((0..f.k_row).map(|b| byte(l, pos, 0, b)));
        }
    }
    for l in 0..f.layers {
        p(&mut out, f.v_type as u32);
        if f.v_trans {
            p(&mut out, f.v_elem as u32);
            p(&mut out, (f.v_row / f.v_elem) as u32);
            for j in 0..f.v_row / f.v_elem {
                for &pos in order {
                    out.extend((0..f.v_elem).map(|e| byte(l, pos, 1, j * f.v_elem + e)));
                }
            }
        } else {
            out.extend_from_slice(&(f.v_row as u64).to_le_bytes());
            for &pos in order {
                out.extend((0..f.v_row).map(|b| byte(l, pos, 1, b)));
            }
        }
    }
    out
}

/// The pool block holding positions `first..first + bs`, as the engine lays it out.
fn pool_block(f: &StateFormat, first: usize, bs: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for l in 0..f.layers {
        for pos in first..first + bs {
            out.extend((0..f.k_row).map(|b| byte(l, pos, 0, b)));
        }
        for pos in first..first + bs {
            out.extend((0..f.v_row).map(|b| byte(l, pos, 1, b)));
        }
    }
    out
}

#[test]
fn cells_in_any_cache_order_become_blocks_in_position_order() {
    for v_trans in [false, true] {
        let f = format(v_trans);
        let bytes = llama_state(&f, &[5, 2, 0, 7, 1, 3, 6, 4]);
        let state = SeqState::parse(&bytes).expect("parses");
        assert_eq!(state.format, f);
        assert_eq!(state.positions(), 8);
        for first in [0, 4] {
            let mut block = vec![0u8; f.block_bytes(4)];
            state.copy_block(first, 4, &mut block).expect("copies");
            assert_eq!(
                block,
                pool_block(&f, first, 4),
                "v_trans {v_trans} block at {first}"
            );
        }
    }
}

#[test]
fn built_states_are_what_llama_cpp_writes_for_positions_in_order() {
    for v_trans in [false, true] {
        let f = format(v_trans);
        let blocks = [pool_block(&f, 0, 4), pool_block(&f, 4, 4)];
        let refs: Vec<&[u8]> = blocks.iter().map(|b| b.as_slice()).collect();
        // Six positions: the second block is used in part.
        let built = build(&f, 4, 6, &refs).expect("builds");
        let mut expected = llama_state(&f, &[0, 1, 2, 3, 4, 5]);
        // Our writer names sequence 0 where llama.cpp wrote the source's id.
        expected[4..8].copy_from_slice(&0u32.to_le_bytes());
        for cell in 0..6 {
            let at = 16 + cell * 12 + 8;
            expected[at..at + 4].copy_from_slice(&0u32.to_le_bytes());
        }
        assert_eq!(built, expected, "v_trans {v_trans}");
    }
}

#[test]
fn damaged_states_are_errors_not_panics() {
    let f = format(false);
    let bytes = llama_state(&f, &[0, 1, 2, 3]);
    let mut wrong = bytes.clone();
    wrong[0] ^= 1;
    assert!(matches!(SeqState::parse(&wrong), Err(StateError::Magic(_))));
    for cut in [0, 3, 9, 40, bytes.len() - 1] {
        assert!(
            SeqState::parse(&bytes[..cut]).is_err(),
            "a state cut at {cut} parsed"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert!(matches!(
        SeqState::parse(&longer),
        Err(StateError::Changed(_))
    ));
    let state = SeqState::parse(&bytes).expect("parses");
    let mut block = vec![0u8; f.block_bytes(4)];
    assert_eq!(
        state.copy_block(4, 4, &mut block),
        Err(StateError::MissingPosition(4))
    );
    let mut short = vec![0u8; 3];
    assert!(state.copy_block(0, 4, &mut short).is_err());
    assert!(
        build(&f, 4, 6, &[&block]).is_err(),
        "one block cannot hold six positions"
    );
}
