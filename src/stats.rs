//! Run statistics: VM exits by reason with handling time, time in the guest
//! versus in the VMM, hypercalls by name, the engine's own counters, and what
//! all of them grew by during each benchmark phase the guest announced.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct ExitStat {
    pub count: u64,
    /// Time the VMM spent handling these exits.
    pub total_ns: u64,
}

#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub engine: String,
    pub exits: BTreeMap<&'static str, ExitStat>,
    pub hypercalls: BTreeMap<String, u64>,
    /// Accesses to ports / addresses no device claims.
    pub unclaimed_pio: u64,
    pub unclaimed_mmio: u64,
    /// Time inside the engine's `run` (the guest, plus engine work).
    pub guest_time: Duration,
    /// Time in the VMM loop handling exits.
    pub vmm_time: Duration,
    pub wall_time: Duration,
    pub engine_counters: Vec<(String, u64)>,
    /// The benchmark phases, in the order they ended.
    pub phases: Vec<Phase>,
    /// The phase under way: its name and the counters at its start.
    open_phase: Option<(String, BTreeMap<String, u64>)>,
}

/// One benchmark phase (`abi::port::BENCH_PHASE`, `bench_phase` hypercall):
/// how much each counter grew between its start and its end.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phase {
    /// `abi::bench::NAMES` (`<name> baseline` with `abi::bench::BASELINE`),
    /// or `phase<n>` for a number that names none.
    pub name: String,
    /// Counters that grew, by how much: the engine's (as in
    /// `engine_counters`, `group/name`), the VMM's exits (`exits/<reason>`)
    /// and hypercalls (`hypercalls/<name>`). The exit of the marker that
    /// closes the phase is counted in it.
    pub counters: BTreeMap<String, u64>,
}

/// Phases recorded at most (a guest that announces more is not followed).
pub const MAX_PHASES: usize = 4096;

#[derive(Serialize)]
struct Json<'a> {
    engine: &'a str,
    exits: BTreeMap<&'a str, u64>,
    exit_handling_ns: BTreeMap<&'a str, u64>,
    hypercalls: &'a BTreeMap<String, u64>,
    unclaimed_pio: u64,
    unclaimed_mmio: u64,
    wall_time_ns: u64,
    guest_time_ns: u64,
    vmm_time_ns: u64,
    engine_counters: BTreeMap<&'a str, u64>,
    /// Grouped engine counters (`group/name`), one object per group at the
    /// top level: `traps`, `holes`, `shadow`, `reflected`, ...
    #[serde(flatten)]
    groups: BTreeMap<&'a str, BTreeMap<&'a str, u64>>,
    phases: &'a [Phase],
    outcome: &'a str,
    exit_status: i32,
}

impl Stats {
    pub fn new(engine: &str) -> Self {
        Stats {
            engine: engine.to_string(),
            ..Default::default()
        }
    }

    pub fn record_exit(&mut self, reason: &'static str, handling: Duration) {
        let e = self.exits.entry(reason).or_default();
        e.count += 1;
        e.total_ns += handling.as_nanos() as u64;
        self.vmm_time += handling;
    }

    /// A phase boundary the guest announced: `phase` 0 ends the phase under
    /// way, any other number also starts phase `phase`. `engine` is the
    /// engine's counters now.
    pub fn mark_phase(&mut self, phase: u32, engine: Vec<(String, u64)>) {
        let mut now: BTreeMap<String, u64> = engine.into_iter().collect();
        for (reason, e) in &self.exits {
            now.insert(format!("exits/{reason}"), e.count);
        }
        for (name, n) in &self.hypercalls {
            now.insert(format!("hypercalls/{name}"), *n);
        }
        if let Some((name, start)) = self.open_phase.take() {
            let counters = now
                .iter()
                .filter_map(|(k, v)| {
                    let grew = v.saturating_sub(start.get(k).copied().unwrap_or(0));
                    (grew > 0).then(|| (k.clone(), grew))
                })
                .collect();
            if self.phases.len() < MAX_PHASES {
                self.phases.push(Phase { name, counters });
            }
        }
        if phase != 0 {
            let base = phase & !abi::bench::BASELINE;
            let name = match abi::bench::name(base) {
                Some(n) if base != phase => format!("{n} baseline"),
                Some(n) => n.to_string(),
                None => format!("phase{phase}"),
            };
            self.open_phase = Some((name, now));
        }
    }

    pub fn total_exits(&self) -> u64 {
        self.exits.values().map(|e| e.count).sum()
    }

    /// The human-readable table `--stats` prints.
    pub fn table(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let wall = self.wall_time.as_secs_f64();
        let pct = |d: Duration| {
            if wall > 0.0 {
                100.0 * d.as_secs_f64() / wall
            } else {
                0.0
            }
        };
        let _ = writeln!(s, "visor stats: engine {}", self.engine);
        let _ = writeln!(
            s,
            "  wall {:.3} s | in guest {:.3} s ({:.1}%) | in VMM {:.3} s ({:.1}%)",
            wall,
            self.guest_time.as_secs_f64(),
            pct(self.guest_time),
            self.vmm_time.as_secs_f64(),
            pct(self.vmm_time)
        );
        let _ = writeln!(
            s,
            "  {:<16} {:>12} {:>14} {:>12}",
            "exit reason", "count", "total ms", "mean us"
        );
        for (name, e) in &self.exits {
            let _ = writeln!(
                s,
                "  {:<16} {:>12} {:>14.3} {:>12.3}",
                name,
                e.count,
                e.total_ns as f64 / 1e6,
                e.total_ns as f64 / 1e3 / e.count.max(1) as f64
            );
        }
        let _ = writeln!(s, "  {:<16} {:>12}", "total", self.total_exits());
        if self.unclaimed_pio + self.unclaimed_mmio > 0 {
            let _ = writeln!(
                s,
                "  unclaimed accesses: {} port I/O, {} MMIO",
                self.unclaimed_pio, self.unclaimed_mmio
            );
        }
        if !self.hypercalls.is_empty() {
            let _ = writeln!(s, "  {:<16} {:>12}", "hypercall", "count");
            for (name, n) in &self.hypercalls {
                let _ = writeln!(s, "  {:<16} {:>12}", name, n);
            }
        }
        if !self.engine_counters.is_empty() {
            let _ = writeln!(s, "  engine counters ({}):", self.engine);
            let mut group = "";
            for (name, n) in &self.engine_counters {
                let (g, short) = name.split_once('/').unwrap_or(("", name));
                if g != group && !g.is_empty() {
                    let _ = writeln!(s, "  {g}:");
                }
                group = g;
                let indent = if g.is_empty() { "" } else { "  " };
                let _ = writeln!(s, "  {indent}{:<28} {:>12}", short, n);
            }
        }
        s
    }

    pub fn to_json(&self, outcome: &str, exit_status: i32) -> String {
        let j = Json {
            engine: &self.engine,
            exits: self.exits.iter().map(|(k, v)| (*k, v.count)).collect(),
            exit_handling_ns: self.exits.iter().map(|(k, v)| (*k, v.total_ns)).collect(),
            hypercalls: &self.hypercalls,
            unclaimed_pio: self.unclaimed_pio,
            unclaimed_mmio: self.unclaimed_mmio,
            wall_time_ns: self.wall_time.as_nanos() as u64,
            guest_time_ns: self.guest_time.as_nanos() as u64,
            vmm_time_ns: self.vmm_time.as_nanos() as u64,
            engine_counters: self
                .engine_counters
                .iter()
                .filter(|(k, _)| !k.contains('/'))
                .map(|(k, v)| (k.as_str(), *v))
                .collect(),
            groups: {
                let mut g: BTreeMap<&str, BTreeMap<&str, u64>> = BTreeMap::new();
                for (k, v) in &self.engine_counters {
                    if let Some((group, name)) = k.split_once('/') {
                        g.entry(group).or_default().insert(name, *v);
                    }
                }
                g
            },
            phases: &self.phases,
            outcome,
            exit_status,
        };
        serde_json::to_string_pretty(&j).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_keys() {
        let mut s = Stats::new("kvm");
        s.record_exit("io_out", Duration::from_micros(3));
        s.record_exit("io_out", Duration::from_micros(5));
        s.wall_time = Duration::from_millis(2);
        let v: serde_json::Value = serde_json::from_str(&s.to_json("powered off", 0)).unwrap();
        assert_eq!(v["engine"], "kvm");
        assert_eq!(v["exits"]["io_out"], 2);
        assert_eq!(v["exit_handling_ns"]["io_out"], 8000);
        assert!(v["hypercalls"].as_object().unwrap().is_empty());
        assert_eq!(v["wall_time_ns"], 2_000_000);
        assert!(s.table().contains("io_out"));
    }

    #[test]
    fn grouped_engine_counters() {
        let mut s = Stats::new("trap");
        s.engine_counters = vec![
            ("guest_instructions".into(), 7),
            ("traps/cli".into(), 3),
            ("holes/popf".into(), 1),
        ];
        let v: serde_json::Value = serde_json::from_str(&s.to_json("powered off", 0)).unwrap();
        assert_eq!(v["engine_counters"]["guest_instructions"], 7);
        assert!(v["engine_counters"].get("traps/cli").is_none());
        assert_eq!(v["traps"]["cli"], 3);
        assert_eq!(v["holes"]["popf"], 1);
        let t = s.table();
        assert!(t.contains("traps:") && t.contains("popf"), "{t}");
    }

    /// A phase records how much each counter grew between its markers, under
    /// the benchmark's name; counters that did not grow are left out.
    #[test]
    fn phases() {
        let mut s = Stats::new("trap");
        let cr8wr = abi::bench::phase("cr8wr").unwrap();
        s.record_exit("io_out", Duration::ZERO);
        s.mark_phase(cr8wr, vec![("traps/mov to cr8".into(), 5), ("x".into(), 1)]);
        s.record_exit("io_out", Duration::ZERO);
        *s.hypercalls.entry("version".into()).or_default() += 3;
        s.mark_phase(0, vec![("traps/mov to cr8".into(), 105), ("x".into(), 1)]);
        s.mark_phase(0, vec![]);
        s.mark_phase(999, vec![]);
        s.mark_phase(cr8wr | abi::bench::BASELINE, vec![]);
        s.mark_phase(0, vec![]);
        assert_eq!(s.phases.len(), 3);
        assert_eq!(s.phases[2].name, "cr8wr baseline");
        let p = &s.phases[0];
        assert_eq!(p.name, "cr8wr");
        assert_eq!(p.counters["traps/mov to cr8"], 100);
        assert_eq!(p.counters["exits/io_out"], 1);
        assert_eq!(p.counters["hypercalls/version"], 3);
        assert!(!p.counters.contains_key("x"));
        assert_eq!(s.phases[1].name, "phase999");
        let v: serde_json::Value = serde_json::from_str(&s.to_json("powered off", 0)).unwrap();
        assert_eq!(v["phases"][0]["counters"]["traps/mov to cr8"], 100);
    }
}
