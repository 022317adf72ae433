//! What `/proc` says of a process (the service's, or this tool's own): its
//! resident memory and the CPU time it has used, for the figures per
//! subscriber and per request, the write calls it has made (a socket
//! write is most of what a delivery costs the kernel), and how long its
//! threads waited for a CPU.

/// What `/proc` says of a process: resident memory (bytes) and CPU time used
/// (seconds).
pub fn process_usage(pid: u32) -> Option<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    usage(&status, &stat)
}

/// The write-type system calls (`write`, `writev`, `sendmsg`, ...) the
/// process has made, all its threads together (`syscw` of `/proc/PID/io`).
pub fn process_writes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    writes(&io)
}

/// [`process_writes`] from the text of `/proc/PID/io`.
fn writes(io: &str) -> Option<u64> {
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))?
        .trim()
        .parse()
        .ok()
}

/// What the scheduler says of a process's threads, summed: seconds run on a
/// CPU, and seconds spent runnable but waiting for one (from each
/// `/proc/PID/task/TID/schedstat`; threads that ended are not counted).
pub fn scheduler_times(pid: u32) -> Option<(f64, f64)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    let mut total = (0.0, 0.0);
    for task in tasks.flatten() {
        let Ok(text) = std::fs::read_to_string(task.path().join("schedstat")) else {
            continue;
        };
        if let Some((ran, waited)) = schedstat(&text) {
            total.0 += ran;
            total.1 += waited;
        }
    }
    Some(total)
}

/// Seconds on a CPU and waiting for one, from a `schedstat` line
/// (nanoseconds run, nanoseconds waited, time slices).
fn schedstat(text: &str) -> Option<(f64, f64)> {
    let mut fields = text.split_whitespace();
    let ran: u64 = fields.next()?.parse().ok()?;
    let waited: u64 = fields.next()?.parse().ok()?;
    Some((ran as f64 / 1e9, waited as f64 / 1e9))
}

/// [`process_usage`] from the text of `/proc/PID/status` and `/proc/PID/stat`.
fn usage(status: &str, stat: &str) -> Option<(u64, f64)> {
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    // Fields after the command (which may hold spaces): utime is the 14th
    // field of the line, stime the 15th, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some((rss_kb * 1024, ticks as f64 / 100.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rss_and_cpu_past_a_command_with_spaces() {
        let status = "Name:\tchatshard\nVmPeak:\t  90000 kB\nVmRSS:\t   51200 kB\nThreads:\t9\n";
        let stat = "4242 (chat shard) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 9 0";
        assert_eq!(usage(status, stat), Some((51200 * 1024, 3.0)));
    }

    #[test]
    fn reads_the_write_calls() {
        let io = "rchar: 6976\nwchar: 12\nsyscr: 10\nsyscw: 42\nread_bytes: 0\n";
        assert_eq!(writes(io), Some(42));
        assert_eq!(writes("rchar: 1\n"), None);
    }

    #[test]
    fn nothing_from_a_partial_file() {
        assert_eq!(usage("Name:\tx\n", "1 (x) S 1 2 3"), None);
        assert_eq!(usage("VmRSS:\t1 kB\n", "1 (x) S 1 2 3"), None);
    }

    #[test]
    fn a_schedstat_line_is_seconds_run_and_waited() {
        assert_eq!(schedstat("2500000000 500000000 42\n"), Some((2.5, 0.5)));
        assert_eq!(schedstat("12"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read() {
        let (rss, _) = process_usage(std::process::id()).unwrap_or_default();
        assert!(rss > 0);
    }
}
