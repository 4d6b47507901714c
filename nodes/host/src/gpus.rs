//! The GPUs this machine offers: declared (`--gpus N`), or found (`--gpus auto`) through
//! NVML when the NVIDIA driver's library loads (at run time, so building needs no CUDA or
//! driver), else from the driver's `/proc` entries, else none. Found GPUs are those this
//! process's `CUDA_VISIBLE_DEVICES` lets it see, when it is set; the plan's GPU ids then
//! number those (see [`cuda_visible`]).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use dynamo_runtime::supervisor::cuda_visible;
use serde::{Deserialize, Serialize};

/// Where the driver lists one directory per GPU.
const PROC_GPUS: &str = "/proc/driver/nvidia/gpus";

/// What `--gpus` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GpuCount {
    /// Find them: NVML, else `/proc`, else none.
    #[default]
    Auto,
    Declared(u32),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is neither `auto` nor a number of GPUs (0, 1, 2, …)")]
pub struct GpuCountError(String);

impl FromStr for GpuCount {
    type Err = GpuCountError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(GpuCount::Auto);
        }
        t.parse()
            .map(GpuCount::Declared)
            .map_err(|_| GpuCountError(s.to_string()))
    }
}

impl fmt::Display for GpuCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GpuCount::Auto => write!(f, "auto"),
            GpuCount::Declared(n) => write!(f, "{n}"),
        }
    }
}

/// Where a machine's GPU count came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GpuSource {
    Nvml,
    Proc,
    Declared,
    /// Nothing found: no NVML, no driver entries.
    None,
}

/// One GPU as NVML describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuDevice {
    /// The driver's index (as `nvidia-smi` numbers it).
    pub index: u32,
    /// `GPU-…`; empty in records of older agents.
    #[serde(default)]
    pub uuid: String,
    pub name: String,
    /// Total memory, MiB.
    pub memory_mib: u64,
}

/// The GPUs of this machine and how they were counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpus {
    pub count: u32,
    pub source: GpuSource,
    /// Listed when NVML counted them.
    pub devices: Vec<GpuDevice>,
    /// Why NVML did not count them (`auto` only).
    pub nvml_error: Option<String>,
    /// This process's `CUDA_VISIBLE_DEVICES` entries when it is set (`auto` only).
    pub visible: Option<Vec<String>>,
}

impl Gpus {
    /// The GPUs `count` asks for: declared ones as they are, else found.
    pub fn resolve(count: GpuCount) -> Gpus {
        match count {
            GpuCount::Declared(n) => Gpus {
                count: n,
                source: GpuSource::Declared,
                devices: Vec::new(),
                nvml_error: None,
                visible: None,
            },
            GpuCount::Auto => Gpus::detect(),
        }
    }

    /// NVML's count when its library loads and answers, else the driver's `/proc`
    /// entries, else none; narrowed by `CUDA_VISIBLE_DEVICES` when it is set. Never
    /// fails: a machine without GPUs has none.
    pub fn detect() -> Gpus {
        let visible = cuda_visible::from_env();
        match nvml_devices() {
            Ok(all) => Gpus::listed(all, visible),
            Err(e) => Gpus::counted(proc_count(Path::new(PROC_GPUS)), visible, e.to_string()),
        }
    }

    /// The GPUs of NVML's list `all` that `visible` names, in its order.
    fn listed(all: Vec<GpuDevice>, visible: Option<Vec<String>>) -> Gpus {
        let devices = match &visible {
            Some(v) => select_visible(all, v),
            None => all,
        };
        Gpus {
            count: u32::try_from(devices.len()).unwrap_or(u32::MAX),
            source: GpuSource::Nvml,
            devices,
            nvml_error: None,
            visible,
        }
    }

    /// The driver's count (`None`: no driver), narrowed by `visible`.
    fn counted(driver: Option<u32>, visible: Option<Vec<String>>, nvml_error: String) -> Gpus {
        let (count, source) = match driver {
            Some(n) => (n, GpuSource::Proc),
            None => (0, GpuSource::None),
        };
        let count = match &visible {
            // Without NVML a UUID cannot be checked: it counts if the driver has GPUs.
            Some(v) => v
                .iter()
                .take_while(|e| e.parse::<u32>().map_or(count > 0, |i| i < count))
                .count()
                .try_into()
                .unwrap_or(u32::MAX),
            None => count,
        };
        Gpus {
            count,
            source,
            devices: Vec::new(),
            nvml_error: Some(nvml_error),
            visible,
        }
    }

    /// One line for the log: how many, where from, and which.
    pub fn describe(&self) -> String {
        let plural = if self.count == 1 { "" } else { "s" };
        let mut s = format!("{} GPU{plural}", self.count);
        match self.source {
            GpuSource::Nvml => s.push_str(" (NVML)"),
            GpuSource::Declared => s.push_str(" (declared by --gpus)"),
            GpuSource::Proc => s.push_str(&format!(" ({PROC_GPUS})")),
            GpuSource::None => s.push_str(&format!(" (no NVML, no {PROC_GPUS})")),
        }
        if let Some(v) = &self.visible {
            s.push_str(&format!("; CUDA_VISIBLE_DEVICES={}", v.join(",")));
        }
        if let Some(e) = &self.nvml_error {
            s.push_str(&format!("; NVML: {e}"));
        }
        for d in &self.devices {
            s.push_str(&format!("; {}: {} {} MiB", d.index, d.name, d.memory_mib));
        }
        s
    }
}

/// The GPUs NVML lists, with their names and memory (a device that answers only its
/// index still counts).
fn nvml_devices() -> Result<Vec<GpuDevice>, nvml_wrapper::error::NvmlError> {
    let nvml = nvml_wrapper::Nvml::init()?;
    let count = nvml.device_count()?;
    let devices = (0..count)
        .map(|index| {
            let device = nvml.device_by_index(index);
            let name = (device.as_ref().ok())
                .and_then(|d| d.name().ok())
                .unwrap_or_else(|| "unknown".to_string());
            let memory_mib = (device.as_ref().ok())
                .and_then(|d| d.memory_info().ok())
                .map(|m| m.total / (1024 * 1024))
                .unwrap_or(0);
            let uuid = (device.as_ref().ok())
                .and_then(|d| d.uuid().ok())
                .unwrap_or_default();
            GpuDevice {
                index,
                uuid,
                name,
                memory_mib,
            }
        })
        .collect();
    Ok(devices)
}

/// The devices of `all` that the `CUDA_VISIBLE_DEVICES` entries `visible` name, in their
/// order: an index, or a unique prefix of a `GPU-` UUID. As CUDA does, the list ends at
/// the first entry that names no device (a `MIG-` instance is not in NVML's list of
/// GPUs: declare those with `--gpus`).
fn select_visible(mut all: Vec<GpuDevice>, visible: &[String]) -> Vec<GpuDevice> {
    let mut out = Vec::new();
    for entry in visible {
        let found: Vec<usize> = match entry.parse::<u32>() {
            Ok(index) => (all.iter().enumerate())
                .filter(|(_, d)| d.index == index)
                .map(|(i, _)| i)
                .collect(),
            Err(_) => (all.iter().enumerate())
                .filter(|(_, d)| !d.uuid.is_empty() && d.uuid.starts_with(entry.as_str()))
                .map(|(i, _)| i)
                .collect(),
        };
        match found.as_slice() {
            [one] => out.push(all.remove(*one)),
            _ => break,
        }
    }
    out
}

/// The GPUs the driver lists under `dir` (one entry each); `None` when it lists none
/// there (no driver loaded).
pub fn proc_count(dir: &Path) -> Option<u32> {
    let entries = std::fs::read_dir(dir).ok()?;
    Some(u32::try_from(entries.count()).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_as_auto_or_a_number() {
        assert_eq!("auto".parse(), Ok(GpuCount::Auto));
        assert_eq!("AUTO".parse(), Ok(GpuCount::Auto));
        assert_eq!("4".parse(), Ok(GpuCount::Declared(4)));
        assert_eq!("0".parse(), Ok(GpuCount::Declared(0)));
        for bad in ["", "-1", "four", "2.5", "auto4"] {
            let err = bad.parse::<GpuCount>().expect_err(bad);
            assert_eq!(
                err.to_string(),
                format!("`{bad}` is neither `auto` nor a number of GPUs (0, 1, 2, …)")
            );
        }
        assert_eq!(GpuCount::default(), GpuCount::Auto);
        assert_eq!(GpuCount::Declared(3).to_string(), "3");
    }

    #[test]
    fn a_declared_count_is_taken_as_it_is() {
        let g = Gpus::resolve(GpuCount::Declared(8));
        assert_eq!((g.count, g.source), (8, GpuSource::Declared));
        assert!(g.devices.is_empty() && g.nvml_error.is_none());
        assert_eq!(g.describe(), "8 GPUs (declared by --gpus)");
    }

    /// Whatever this machine has (here: no GPU, no NVML library), `auto` gives a count
    /// that agrees with its source, without panicking.
    #[test]
    fn auto_counts_without_failing() {
        let g = Gpus::resolve(GpuCount::Auto);
        match g.source {
            GpuSource::Nvml => {
                assert_eq!(g.count as usize, g.devices.len());
                assert!(g.nvml_error.is_none());
            }
            GpuSource::Proc => {
                if g.visible.is_none() {
                    assert_eq!(Some(g.count), proc_count(Path::new(PROC_GPUS)));
                }
                assert!(g.devices.is_empty() && g.nvml_error.is_some());
            }
            GpuSource::None => {
                assert_eq!(g.count, 0);
                assert!(g.nvml_error.is_some(), "why NVML did not count is kept");
            }
            GpuSource::Declared => panic!("auto is never declared"),
        }
        assert!(g.describe().starts_with(&format!("{} GPU", g.count)));
    }

    fn device(index: u32, uuid: &str) -> GpuDevice {
        GpuDevice {
            index,
            uuid: uuid.into(),
            name: "NVIDIA H100 80GB HBM3".into(),
            memory_mib: 81559,
        }
    }

    fn entries(v: &str) -> Option<Vec<String>> {
        Some(cuda_visible::parse(v))
    }

    #[test]
    fn nvml_counts_only_the_visible_gpus_in_their_order() {
        let all = || {
            (0..4)
                .map(|i| device(i, &format!("GPU-{i}a{i}b-77")))
                .collect()
        };
        let g = Gpus::listed(all(), None);
        assert_eq!((g.count, g.source), (4, GpuSource::Nvml));
        let g = Gpus::listed(all(), entries("3,GPU-1a1,0"));
        let picked: Vec<u32> = g.devices.iter().map(|d| d.index).collect();
        assert_eq!((g.count, picked), (3, vec![3, 1, 0]));
        assert!(
            g.describe().contains("CUDA_VISIBLE_DEVICES=3,GPU-1a1,0"),
            "{}",
            g.describe()
        );
        // As CUDA: the list ends at an entry naming no GPU (or an ambiguous prefix).
        assert_eq!(Gpus::listed(all(), entries("1,7,2")).count, 1);
        assert_eq!(Gpus::listed(all(), entries("GPU-,2")).count, 0);
        assert_eq!(Gpus::listed(all(), entries("")).count, 0, "empty: none");
    }

    #[test]
    fn the_driver_count_is_narrowed_by_the_visible_list() {
        let g = Gpus::counted(Some(4), entries("2,3"), "no libnvidia-ml".into());
        assert_eq!((g.count, g.source), (2, GpuSource::Proc));
        assert_eq!(
            Gpus::counted(Some(2), entries("1,2,0"), String::new()).count,
            1
        );
        assert_eq!(
            Gpus::counted(Some(2), entries("GPU-8d1a"), String::new()).count,
            1
        );
        assert_eq!(Gpus::counted(None, entries("0,1"), String::new()).count, 0);
        assert_eq!(Gpus::counted(Some(8), None, String::new()).count, 8);
    }

    #[test]
    fn the_driver_lists_one_entry_per_gpu() {
        let dir = std::env::temp_dir().join(format!("dynamo-gpus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(proc_count(&dir), None, "no driver");
        for id in ["0000:07:00.0", "0000:0f:00.0"] {
            std::fs::create_dir_all(dir.join(id)).expect("fake GPU entry");
        }
        assert_eq!(proc_count(&dir), Some(2));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
