//! `CUDA_VISIBLE_DEVICES`: which GPUs a process may use, and what its children get.
//!
//! A plan numbers a machine's GPUs 0, 1, …. When the agent (or a one-machine `graph up`)
//! itself runs under `CUDA_VISIBLE_DEVICES=2,3`, it offers two GPUs, and the plan's GPU 0
//! is the machine's GPU 2: a child given plan GPUs `[0]` gets `CUDA_VISIBLE_DEVICES=2`.
//! Entries are read as CUDA reads them: device indices, or `GPU-…`/`MIG-…` UUIDs
//! (prefixes allowed), separated by commas; the list ends at the first entry that is
//! none of these, or repeats one before it, and an empty value means no GPU at all.

/// The environment variable.
pub const CUDA_VISIBLE_DEVICES: &str = "CUDA_VISIBLE_DEVICES";

/// This process's visible-device entries; `None` when the variable is unset (every GPU
/// is visible, numbered as the driver numbers them).
pub fn from_env() -> Option<Vec<String>> {
    std::env::var(CUDA_VISIBLE_DEVICES).ok().map(|v| parse(&v))
}

/// The entries CUDA would use from `value`, in order.
pub fn parse(value: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for entry in value.split(',').map(str::trim) {
        let index = !entry.is_empty() && entry.bytes().all(|b| b.is_ascii_digit());
        let uuid = entry.len() > 4 && (entry.starts_with("GPU-") || entry.starts_with("MIG-"));
        if !(index || uuid) || out.iter().any(|e| e == entry) {
            break;
        }
        out.push(entry.to_string());
    }
    out
}

/// A plan GPU id past what this process sees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the plan gives GPU {id}, but this process sees only {count} (CUDA_VISIBLE_DEVICES={visible})"
)]
pub struct NotVisible {
    pub id: u32,
    pub count: usize,
    pub visible: String,
}

/// The `CUDA_VISIBLE_DEVICES` value for a child given the plan GPU ids `ids`, when this
/// process sees `visible` (`None`: all of the machine's GPUs, so the ids are the driver's).
pub fn for_child(ids: &[u32], visible: Option<&[String]>) -> Result<String, NotVisible> {
    let Some(visible) = visible else {
        let ids: Vec<String> = ids.iter().map(u32::to_string).collect();
        return Ok(ids.join(","));
    };
    let mut out = Vec::with_capacity(ids.len());
    for &id in ids {
        let entry = visible.get(id as usize).ok_or_else(|| NotVisible {
            id,
            count: visible.len(),
            visible: visible.join(","),
        })?;
        out.push(entry.as_str());
    }
    Ok(out.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_read_as_cuda_reads_them() {
        assert_eq!(parse("2,3"), ["2", "3"]);
        assert_eq!(parse(" 1 , 0 "), ["1", "0"]);
        assert_eq!(parse(""), Vec::<String>::new(), "empty: no GPU");
        assert_eq!(parse("-1"), Vec::<String>::new());
        assert_eq!(parse("0,-1,1"), ["0"], "the list ends at an invalid entry");
        assert_eq!(parse("0,1,0,2"), ["0", "1"], "and at a repeat");
        assert_eq!(
            parse("GPU-8d1a,MIG-5c3b/1/0,3"),
            ["GPU-8d1a", "MIG-5c3b/1/0", "3"]
        );
        assert_eq!(parse("GPU-"), Vec::<String>::new());
        assert_eq!(parse("nvidia0"), Vec::<String>::new());
    }

    #[test]
    fn a_child_gets_the_entries_its_plan_ids_number() {
        assert_eq!(for_child(&[0, 1], None).as_deref(), Ok("0,1"));
        assert_eq!(for_child(&[], None).as_deref(), Ok(""));
        let visible = parse("2,3,GPU-8d1a");
        assert_eq!(for_child(&[0], Some(&visible)).as_deref(), Ok("2"));
        assert_eq!(
            for_child(&[2, 1], Some(&visible)).as_deref(),
            Ok("GPU-8d1a,3")
        );
        let err = for_child(&[3], Some(&visible)).expect_err("only three");
        assert_eq!(
            err.to_string(),
            "the plan gives GPU 3, but this process sees only 3 (CUDA_VISIBLE_DEVICES=2,3,GPU-8d1a)"
        );
    }
}
