//! CPU time a measured phase used, from `/proc`: the whole machine, the named processes (the
//! ledger, the sidecar) and the load generator (this process); the rest is PostgreSQL and
//! whatever else ran.
//!
//! Throughput on this shared two-core machine moves by a third between consecutive runs of one
//! binary, so a change worth 10% cannot be seen in pairs/s. CPU time per pair says how much work
//! a pair costs, which a slower machine changes less; `steal` says when the host took the cores.

use anyhow::{Context, Result};

/// Linux reports process and machine CPU times in USER_HZ ticks, 100 per second on every
/// mainstream configuration (it is fixed by the ABI, not the kernel's tick rate).
const TICKS_PER_SECOND: f64 = 100.0;

/// Cumulative CPU ticks at one instant.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    busy: u64,
    steal: u64,
    total: u64,
    /// Each named process's ticks, in the order asked for.
    processes: Vec<(&'static str, u64)>,
    load: u64,
}

/// Reads the machine's, the named processes' and this process's CPU ticks so far.
pub(crate) fn sample(processes: &[(&'static str, u32)]) -> Result<Sample> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let (busy, steal, total) = machine_ticks(&stat).context("parsing /proc/stat")?;
    let processes = processes
        .iter()
        .map(|&(name, pid)| Ok((name, process_ticks(&format!("/proc/{pid}/stat"))?)))
        .collect::<Result<_>>()?;
    Ok(Sample {
        busy,
        steal,
        total,
        processes,
        load: process_ticks("/proc/self/stat")?,
    })
}

/// `(busy, steal, total)` from the first line of /proc/stat: `cpu user nice system idle iowait
/// irq softirq steal ...`. Busy is everything but idle, iowait and steal.
fn machine_ticks(stat: &str) -> Option<(u64, u64, u64)> {
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = fields.try_into().ok()?;
    let busy = user + nice + system + irq + softirq;
    Some((busy, steal, busy + idle + iowait + steal))
}

/// utime + stime of a process (all its threads), fields 14 and 15 of its stat file. The command
/// name (field 2) may hold spaces, so fields are counted after its closing parenthesis.
fn process_ticks(path: &str) -> Result<u64> {
    let stat = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let after_name = stat
        .rsplit_once(')')
        .with_context(|| format!("parsing {path}"))?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // after_name starts at field 3 (state), so field n is at index n - 3.
    let ticks = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .with_context(|| format!("{path}: no field {n}"))?
            .parse()
            .with_context(|| format!("{path}: field {n}"))
    };
    Ok(ticks(14)? + ticks(15)?)
}

/// Prints how busy the machine was between `before` and `after`, and the CPU time per unit of
/// work (`unit`: a pair, a call).
#[allow(clippy::cast_precision_loss)] // Tick counts far below 2^52.
pub(crate) fn report(before: &Sample, after: &Sample, units: usize, unit: &str) {
    let ticks = |a: u64, b: u64| b.saturating_sub(a) as f64;
    let total = ticks(before.total, after.total).max(1.0);
    let busy = ticks(before.busy, after.busy);
    let load = ticks(before.load, after.load);
    let cores = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
    let per_unit = |t: f64| t / TICKS_PER_SECOND * 1e6 / (units.max(1) as f64);
    let mut named = String::new();
    let mut accounted = load;
    for ((name, b), (_, a)) in before.processes.iter().zip(&after.processes) {
        let used = ticks(*b, *a);
        accounted += used;
        named.push_str(&format!("{name} {:.0}, ", per_unit(used)));
    }
    println!(
        "  cpu: {:.0}% of {cores:.0} cores busy, steal {:.1}%; per {unit} {:.0} us: {named}load generator {:.0}, PostgreSQL and the rest {:.0}",
        busy / total * 100.0,
        ticks(before.steal, after.steal) / total * 100.0,
        per_unit(busy),
        per_unit(load),
        per_unit((busy - accounted).max(0.0)),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_split_busy_steal_and_idle() {
        let stat = "cpu  100 5 20 1000 7 1 2 30 0 0\ncpu0 50 2 10 500 3 0 1 15 0 0\n";
        assert_eq!(machine_ticks(stat), Some((128, 30, 1165)));
        assert_eq!(machine_ticks("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn process_ticks_are_counted_after_the_command_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stat");
        // A command name with spaces and a parenthesis, then fields 3 to 15.
        std::fs::write(
            &path,
            "42 (a (b) c) S 1 42 42 0 -1 4194304 10 0 0 0 250 31 0 0 20 0\n",
        )
        .unwrap();
        assert_eq!(process_ticks(path.to_str().unwrap()).unwrap(), 281);
    }
}
