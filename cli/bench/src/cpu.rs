//! CPU time of server processes from `/proc/<pid>/stat` (Linux): user + system time, so a
//! run can report CPU per request and per streamed token.

use std::time::Duration;

use crate::BenchError;

/// Total user+system CPU time the processes have used so far. A process that cannot be
/// read (gone, not Linux) counts as zero; use [`try_measure_process_cpu`] to see why.
/// Only the processes themselves are counted, not their children.
pub fn measure_process_cpu(pids: &[u32]) -> Duration {
    pids.iter()
        .map(|&pid| match try_process_cpu(pid) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(pid, error = %e, "cannot read process CPU time");
                Duration::ZERO
            }
        })
        .sum()
}

/// Like [`measure_process_cpu`], but fails on the first process that cannot be read.
pub fn try_measure_process_cpu(pids: &[u32]) -> Result<Duration, BenchError> {
    pids.iter().map(|&pid| try_process_cpu(pid)).sum()
}

fn try_process_cpu(pid: u32) -> Result<Duration, BenchError> {
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| BenchError::Process {
            pid,
            reason: e.to_string(),
        })?;
    let ticks = parse_stat_ticks(&stat).ok_or_else(|| BenchError::Process {
        pid,
        reason: "unexpected /proc/<pid>/stat format".into(),
    })?;
    Ok(ticks_to_duration(ticks, clock_ticks_per_second()))
}

/// utime + stime (fields 14 and 15) of a `/proc/<pid>/stat` line, in clock ticks. The
/// command name (field 2) is in parentheses and may hold spaces and ')', so fields are
/// counted from the last ')'.
pub(crate) fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let mut fields = rest.split_whitespace();
    // After ')' comes field 3 (state); utime is field 14, i.e. the 12th from here.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    let per_second = per_second.max(1);
    let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(per_second);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// `sysconf(_SC_CLK_TCK)`; 100 (the Linux value on every common architecture) when it
/// cannot be asked.
fn clock_ticks_per_second() -> u64 {
    #[cfg(unix)]
    {
        // SAFETY: sysconf only reads a constant of the running system.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks > 0 {
            return ticks as u64;
        }
    }
    100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_utime_and_stime_past_a_tricky_name() {
        let stat = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194560 500 0 0 0 170 30 0 0 20 0 8 0 123 456 789";
        assert_eq!(parse_stat_ticks(stat), Some(200));
        assert_eq!(parse_stat_ticks("1 (x) S 1 2"), None);
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn ticks_convert_to_time() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
        assert_eq!(ticks_to_duration(3, 0), Duration::from_secs(3));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn own_process_cpu_grows_with_work() {
        let me = std::process::id();
        let before = try_measure_process_cpu(&[me]);
        assert!(before.is_ok(), "{before:?}");
        // Burn CPU until the tick counter moves; bounded so the test cannot hang.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        let mut after = before.as_ref().map(|d| *d).unwrap_or_default();
        while start.elapsed() < Duration::from_secs(5) {
            for i in 0..1_000_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            after = measure_process_cpu(&[me]);
            if Some(after) > before.as_ref().ok().copied() {
                break;
            }
        }
        std::hint::black_box(x);
        assert!(Some(after) > before.ok(), "CPU time never grew");
        assert!(try_measure_process_cpu(&[u32::MAX]).is_err());
        assert_eq!(measure_process_cpu(&[u32::MAX]), Duration::ZERO);
    }
}
