//! `visor compare`: what each design of CPU virtualization costs, side by
//! side. It runs the nanobenchmarks of the demo OS (`--cmdline bench`,
//! guest/demo/bench.rs) on every engine of the registry in every guest mode
//! the engine offers, several times each, and prints one table: the median
//! time per operation and its ratio to the fastest in the row, then what one
//! operation cost in mechanism: the counters (VM exits, traps, hypercalls,
//! reflected events, instructions...) that grew during the benchmark's
//! phase, per operation, less what its baseline (the same phase with no
//! iteration) grew by. docs/costs.md shows a run and explains it.
//!
//! Each run is a `visor run` of this same binary (`--engine E`, `--no-pv` for
//! native mode, `--stats-json` for the phases), so a run that fails or hangs
//! (`--timeout`) costs its cells, not the comparison. The columns come from
//! the registry alone (`Engine::ALL`, `Engine::guest_modes`,
//! `Engine::unavailable_reason`): a newly registered engine joins the table
//! with no change here.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;
use visor::{Engine, GuestMode};

/// A counter is shown in the mechanism table when it grew by at least this
/// much per operation.
const SHOWN_PER_OP: f64 = 0.5;

#[derive(clap::Args)]
pub struct CompareArgs {
    /// Kernel to benchmark (it must run its benchmarks for `bench` on its
    /// command line and print `bench:` lines); the embedded demo OS without one.
    kernel: Option<PathBuf>,
    /// Engines, comma-separated (default: every engine; those that cannot run
    /// here are listed with the reason).
    #[arg(long, value_name = "LIST")]
    engines: Option<String>,
    /// Runs per engine and guest mode; the table shows medians.
    #[arg(long, default_value_t = 5, value_name = "N")]
    runs: u32,
    /// Iterations of every benchmark (default: each loop is sized to take
    /// about --bench-ms).
    #[arg(long, value_name = "N")]
    iterations: Option<u64>,
    /// Milliseconds a sized benchmark loop takes.
    #[arg(long, default_value_t = 50, value_name = "MS")]
    bench_ms: u64,
    /// Write the table, every run and the per-operation counters as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Draw a grouped bar chart (log scale, one group per benchmark) as SVG.
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Give up on one run after SECONDS (its cells say so).
    #[arg(long, default_value_t = 120.0, value_name = "SECONDS")]
    timeout: f64,
}

/// An engine in one guest mode: a column of the table.
struct Column {
    engine: Engine,
    mode: GuestMode,
    /// Why the engine cannot run here.
    unavailable: Option<String>,
    runs: Vec<Run>,
}

impl Column {
    fn label(&self) -> String {
        format!("{}/{}", self.engine.name(), self.mode.name())
    }
}

/// A `bench:` line of the guest.
#[derive(Clone, Debug, PartialEq)]
enum Line {
    Measured {
        mode: String,
        iterations: u64,
        cycles: f64,
        ns: Option<f64>,
    },
    Unavailable {
        mode: String,
        why: String,
    },
}

/// What one run printed and recorded.
#[derive(Default)]
struct Run {
    lines: BTreeMap<String, Line>,
    /// Benchmark names in the order the guest printed them.
    order: Vec<String>,
    /// Counters that grew in each benchmark's phase.
    phases: BTreeMap<String, BTreeMap<String, u64>>,
    /// Why the run did not end cleanly.
    failure: Option<String>,
}

/// One benchmark in one column, over all runs.
#[derive(Serialize)]
struct Cell {
    engine: &'static str,
    mode: &'static str,
    /// Median over the runs that measured it.
    ns_per_op: Option<f64>,
    cycles_per_op: Option<f64>,
    /// `ns_per_op` over the fastest in the row.
    ratio: Option<f64>,
    runs: Vec<RunCell>,
    /// Median growth per operation of each counter in the benchmark's phase.
    per_op: BTreeMap<String, f64>,
    /// Why there is no measurement.
    unavailable: Option<String>,
}

#[derive(Serialize)]
struct RunCell {
    iterations: u64,
    ns_per_op: Option<f64>,
    cycles_per_op: f64,
}

#[derive(Serialize)]
struct ColumnJson {
    engine: &'static str,
    mode: &'static str,
    design: &'static str,
    available: bool,
    reason: Option<String>,
    /// Runs that did not end cleanly, and why.
    failed_runs: Vec<String>,
}

#[derive(Serialize)]
struct Bench {
    name: String,
    results: Vec<Cell>,
}

#[derive(Serialize)]
struct Report<'a> {
    kernel: String,
    runs: u32,
    iterations: Option<u64>,
    bench_ms: u64,
    columns: Vec<ColumnJson>,
    benchmarks: &'a [Bench],
}

/// An output file, created before any run so that a bad path fails at once.
fn create(what: &str, path: &Path) -> Result<File, String> {
    File::create(path).map_err(|e| format!("{what} {}: cannot write: {e}", path.display()))
}

fn columns(list: Option<&str>) -> Result<Vec<Column>, String> {
    let engines = match list {
        None => Engine::ALL.to_vec(),
        Some(list) => {
            let mut v = Vec::new();
            for name in list.split(',').map(str::trim) {
                let e = Engine::from_name(name).ok_or_else(|| {
                    format!(
                        "--engines: unknown engine {name:?} (engines: {})",
                        Engine::names()
                    )
                })?;
                if !v.contains(&e) {
                    v.push(e);
                }
            }
            v
        }
    };
    Ok(engines
        .into_iter()
        .flat_map(|engine| {
            let unavailable = engine.unavailable_reason();
            engine.guest_modes().iter().map(move |&mode| Column {
                engine,
                mode,
                unavailable: unavailable.clone(),
                runs: Vec::new(),
            })
        })
        .collect())
}

/// `visor compare`: returns the exit status.
pub fn compare(args: CompareArgs) -> Result<i32, String> {
    if args.runs == 0 {
        return Err("--runs 0: at least one run is needed".into());
    }
    if args.iterations == Some(0) {
        return Err("--iterations 0: at least one iteration is needed".into());
    }
    if args.bench_ms == 0 {
        return Err("--bench-ms 0: a loop must take some time".into());
    }
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return Err(format!(
            "--timeout {}: not a number of seconds",
            args.timeout
        ));
    }
    let mut cols = columns(args.engines.as_deref())?;
    if let Some(k) = &args.kernel {
        let image =
            std::fs::read(k).map_err(|e| format!("cannot read kernel {}: {e}", k.display()))?;
        machine::loader::detect(&image).map_err(|e| format!("{}: {e}", k.display()))?;
    }
    let json = args
        .json
        .as_deref()
        .map(|p| create("--json", p))
        .transpose()?;
    let plot = args
        .plot
        .as_deref()
        .map(|p| create("--plot", p))
        .transpose()?;
    if cols.iter().all(|c| c.unavailable.is_some()) {
        let mut why: Vec<_> = cols
            .iter()
            .map(|c| format!("{}: {}", c.engine, c.unavailable.as_deref().unwrap_or("")))
            .collect();
        why.dedup();
        return Err(format!(
            "no engine asked for can run here ({})",
            why.join("; ")
        ));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot find visor itself: {e}"))?;
    let dir = std::env::temp_dir().join(format!("visor-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let runs = args.runs;
    // Round by round, so that a change in the machine's load spreads over
    // every column.
    for i in 1..=runs {
        for col in cols.iter_mut().filter(|c| c.unavailable.is_none()) {
            let start = Instant::now();
            let stats = dir.join(format!("{}-{}-{i}.json", col.engine, col.mode.name()));
            let run = run_once(&exe, &args, col, &stats);
            eprintln!(
                "visor: compare: {} run {i} of {runs}: {:.2} s{}",
                col.label(),
                start.elapsed().as_secs_f64(),
                run.failure
                    .as_deref()
                    .map(|f| format!(" ({f})"))
                    .unwrap_or_default()
            );
            col.runs.push(run);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let benches = cells(&cols);
    if benches.iter().all(|b| {
        b.results
            .iter()
            .all(|c| c.ns_per_op.is_none() && c.cycles_per_op.is_none())
    }) {
        let why = cols
            .iter()
            .flat_map(|c| &c.runs)
            .find_map(|r| r.failure.clone());
        return Err(format!(
            "no benchmark ran ({})",
            why.unwrap_or_else(|| "the kernel printed no `bench:` line".into())
        ));
    }
    let kernel = args
        .kernel
        .as_ref()
        .map_or("demo OS".to_string(), |k| k.display().to_string());
    print!("{}", table(&kernel, runs, &cols, &benches));
    if let Some(mut f) = json {
        let report = Report {
            kernel: kernel.clone(),
            runs,
            iterations: args.iterations,
            bench_ms: args.bench_ms,
            columns: cols
                .iter()
                .map(|c| ColumnJson {
                    engine: c.engine.name(),
                    mode: c.mode.name(),
                    design: c.engine.design(),
                    available: c.unavailable.is_none(),
                    reason: c.unavailable.clone(),
                    failed_runs: c.runs.iter().filter_map(|r| r.failure.clone()).collect(),
                })
                .collect(),
            benchmarks: &benches,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        f.write_all(text.as_bytes())
            .map_err(|e| format!("--json: cannot write: {e}"))?;
    }
    if let Some(mut f) = plot {
        let shown: Vec<usize> = (0..cols.len())
            .filter(|&i| cols[i].unavailable.is_none())
            .collect();
        let groups: Vec<String> = benches.iter().map(|b| b.name.clone()).collect();
        let series: Vec<String> = shown.iter().map(|&i| cols[i].label()).collect();
        let values: Vec<Vec<Option<f64>>> = benches
            .iter()
            .map(|b| shown.iter().map(|&i| b.results[i].ns_per_op).collect())
            .collect();
        let title = format!(
            "visor compare: {kernel}, median ns per operation (no bar: not measured, see the table)"
        );
        let svg = crate::plot::svg(&crate::plot::Chart {
            title: &title,
            groups: &groups,
            series: &series,
            values: &values,
        })?;
        f.write_all(svg.as_bytes())
            .map_err(|e| format!("--plot: cannot write: {e}"))?;
    }
    Ok(0)
}

/// One `visor run` of the benchmarks in `col`'s engine and mode.
fn run_once(exe: &Path, args: &CompareArgs, col: &Column, stats: &Path) -> Run {
    let mut cmdline = format!("bench bench_ms={}", args.bench_ms);
    if let Some(n) = args.iterations {
        cmdline += &format!(" iterations={n}");
    }
    let mut c = Command::new(exe);
    c.arg("run");
    if let Some(k) = &args.kernel {
        c.arg(k);
    }
    c.args(["--engine", col.engine.name(), "--cmdline", &cmdline])
        .arg("--stats-json")
        .arg(stats)
        .args(["--timeout", &args.timeout.to_string()]);
    if col.mode == GuestMode::Native {
        c.arg("--no-pv");
    }
    let out = match c.stdin(Stdio::null()).output() {
        Ok(o) => o,
        Err(e) => {
            return Run {
                failure: Some(format!("cannot run {}: {e}", exe.display())),
                ..Run::default()
            }
        }
    };
    let mut run = parse_output(&String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let why = err
            .lines()
            .filter_map(|l| l.strip_prefix("visor: "))
            .next_back()
            .map(|l| l.strip_prefix("error: ").unwrap_or(l).to_string());
        let status = out
            .status
            .code()
            .map_or("killed by a signal".to_string(), |c| {
                format!("exit status {c}")
            });
        run.failure = Some(match why {
            Some(w) => format!("{w} ({status})"),
            None => status,
        });
    }
    if let Ok(text) = std::fs::read(stats) {
        run.phases = parse_phases(&text);
    }
    run
}

/// The `bench:` lines of a run's console output.
fn parse_output(out: &str) -> Run {
    let mut run = Run::default();
    for line in out.lines() {
        if let Some((name, l)) = parse_line(line.trim_end_matches('\r')) {
            if !run.lines.contains_key(&name) {
                run.order.push(name.clone());
            }
            run.lines.insert(name, l);
        }
    }
    run
}

/// `bench: name=N mode=M iterations=I cycles_per_op=C ns_per_op=X|unknown`
/// or `bench: name=N mode=M unavailable=WHY`.
fn parse_line(line: &str) -> Option<(String, Line)> {
    let rest = line.strip_prefix("bench: ")?;
    let (fields, why) = match rest.split_once(" unavailable=") {
        Some((f, w)) => (f, Some(w)),
        None => (rest, None),
    };
    let kv: BTreeMap<&str, &str> = fields
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect();
    let name = kv.get("name")?.to_string();
    let mode = kv.get("mode")?.to_string();
    let l = match why {
        Some(w) => Line::Unavailable {
            mode,
            why: w.trim().to_string(),
        },
        None => {
            let iterations: u64 = kv.get("iterations")?.parse().ok()?;
            let cycles: f64 = kv.get("cycles_per_op")?.parse().ok()?;
            let ns = kv.get("ns_per_op").and_then(|v| v.parse::<f64>().ok());
            if iterations == 0 || !cycles.is_finite() || cycles < 0.0 {
                return None;
            }
            Line::Measured {
                mode,
                iterations,
                cycles,
                ns: ns.filter(|v| v.is_finite() && *v >= 0.0),
            }
        }
    };
    Some((name, l))
}

/// The `phases` of a `--stats-json` file: counters by benchmark name.
fn parse_phases(json: &[u8]) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return out;
    };
    for p in v["phases"].as_array().into_iter().flatten() {
        let Some(name) = p["name"].as_str() else {
            continue;
        };
        let counters = p["counters"]
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
            .collect();
        out.insert(name.to_string(), counters);
    }
    out
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// The benchmark names: the demo OS's, then any other the kernel printed.
fn bench_names(cols: &[Column]) -> Vec<String> {
    let mut names: Vec<String> = abi::bench::NAMES.iter().map(|s| s.to_string()).collect();
    for r in cols.iter().flat_map(|c| &c.runs) {
        for n in &r.order {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    names
}

fn cell(col: &Column, name: &str) -> Cell {
    let mut c = Cell {
        engine: col.engine.name(),
        mode: col.mode.name(),
        ns_per_op: None,
        cycles_per_op: None,
        ratio: None,
        runs: Vec::new(),
        per_op: BTreeMap::new(),
        unavailable: None,
    };
    if let Some(why) = &col.unavailable {
        c.unavailable = Some(format!("{} cannot run here: {why}", col.engine));
        return c;
    }
    let mut why = None;
    let mut per_op: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for run in &col.runs {
        match run.lines.get(name) {
            Some(Line::Measured {
                mode,
                iterations,
                cycles,
                ns,
            }) if mode == col.mode.name() => {
                c.runs.push(RunCell {
                    iterations: *iterations,
                    ns_per_op: *ns,
                    cycles_per_op: *cycles,
                });
                // What the phase itself costs, measured with no iteration.
                let baseline = run.phases.get(&format!("{name} baseline"));
                for (k, v) in run.phases.get(name).into_iter().flatten() {
                    let base = baseline.and_then(|b| b.get(k)).copied().unwrap_or(0);
                    per_op
                        .entry(k.clone())
                        .or_default()
                        .push(v.saturating_sub(base) as f64 / *iterations as f64);
                }
            }
            Some(Line::Measured { mode, .. }) => {
                why.get_or_insert(format!(
                    "the kernel ran in mode {mode}, not {}",
                    col.mode.name()
                ));
            }
            Some(Line::Unavailable { why: w, .. }) => {
                why.get_or_insert(w.clone());
            }
            None => {
                why.get_or_insert(match &run.failure {
                    Some(f) => format!("the run failed: {f}"),
                    None => "the kernel did not report it".to_string(),
                });
            }
        }
    }
    if c.runs.is_empty() {
        c.unavailable = why;
        return c;
    }
    let measured = c.runs.len();
    c.cycles_per_op = median(c.runs.iter().map(|r| r.cycles_per_op).collect());
    let ns: Vec<f64> = c.runs.iter().filter_map(|r| r.ns_per_op).collect();
    if ns.len() == measured {
        c.ns_per_op = median(ns);
    }
    for (k, mut v) in per_op {
        // A counter missing from a run's phase did not grow there.
        v.resize(measured, 0.0);
        if let Some(m) = median(v) {
            c.per_op.insert(k, m);
        }
    }
    c
}

/// Every cell, by benchmark, with the ratios to the fastest in each row.
fn cells(cols: &[Column]) -> Vec<Bench> {
    bench_names(cols)
        .into_iter()
        .map(|name| {
            let mut results: Vec<Cell> = cols.iter().map(|c| cell(c, &name)).collect();
            let fastest = results
                .iter()
                .filter_map(|c| c.ns_per_op)
                .filter(|v| *v > 0.0)
                .min_by(f64::total_cmp);
            if let Some(f) = fastest {
                for c in &mut results {
                    c.ratio = c.ns_per_op.map(|v| v / f);
                }
            }
            Bench { name, results }
        })
        .collect()
}

/// A time per operation in a few significant digits.
pub fn format_ns(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn format_ratio(r: f64) -> String {
    if r >= 10.0 {
        format!("{r:.0}x")
    } else {
        format!("{r:.1}x")
    }
}

fn format_count(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// The mechanism of one cell: the counters that grew by at least
/// SHOWN_PER_OP per operation, largest first, instructions last.
fn mechanism(c: &Cell) -> String {
    let mut shown: Vec<(&String, f64)> = c
        .per_op
        .iter()
        .filter(|(k, v)| **v >= SHOWN_PER_OP && k.as_str() != "guest_instructions")
        .map(|(k, v)| (k, *v))
        .collect();
    shown.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
    let mut parts: Vec<String> = shown
        .iter()
        .map(|(k, v)| format!("{} {k}", format_count(*v)))
        .collect();
    if let Some(i) = c.per_op.get("guest_instructions") {
        parts.push(format!("{} instructions", format_count(*i)));
    }
    if parts.is_empty() {
        "nothing counted".to_string()
    } else {
        parts.join(", ")
    }
}

/// The table `visor compare` prints.
fn table(kernel: &str, runs: u32, cols: &[Column], benches: &[Bench]) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let shown: Vec<usize> = (0..cols.len())
        .filter(|&i| cols[i].unavailable.is_none())
        .collect();
    let _ = writeln!(
        s,
        "visor compare: {kernel}, {runs} run{} per engine and mode: median ns per operation (its ratio to the fastest in the row)",
        if runs == 1 { "" } else { "s" }
    );
    let mut notes: Vec<String> = Vec::new();
    let mut note = |why: &str| -> usize {
        match notes.iter().position(|n| n == why) {
            Some(i) => i + 1,
            None => {
                notes.push(why.to_string());
                notes.len()
            }
        }
    };
    let width = |i: usize| cols[i].label().len().max(13);
    let _ = write!(s, "\n{:<16}", "benchmark");
    for &i in &shown {
        let _ = write!(s, " {:>w$}", cols[i].label(), w = width(i));
    }
    s.push('\n');
    for b in benches {
        let _ = write!(s, "{:<16}", b.name);
        for &i in &shown {
            let c = &b.results[i];
            let text = match (c.ns_per_op, c.ratio, &c.unavailable) {
                (Some(ns), Some(r), _) => format!("{} ({})", format_ns(ns), format_ratio(r)),
                (Some(ns), None, _) => format_ns(ns),
                (None, _, None) => match c.cycles_per_op {
                    Some(cy) => format!("{} cycles", format_ns(cy)),
                    None => "-".to_string(),
                },
                (None, _, Some(why)) => format!("n/a [{}]", note(why)),
            };
            let _ = write!(s, " {:>w$}", text, w = width(i));
        }
        s.push('\n');
    }
    for c in cols.iter().filter(|c| c.unavailable.is_some()) {
        let _ = writeln!(
            s,
            "\n{} not run: {}",
            c.label(),
            c.unavailable.as_deref().unwrap_or("")
        );
    }
    if !notes.is_empty() {
        s.push('\n');
        for (i, n) in notes.iter().enumerate() {
            let _ = writeln!(s, "[{}] {n}", i + 1);
        }
    }
    let _ = writeln!(
        s,
        "\nmechanism per operation: what grew during the benchmark's phase, divided by its iterations\n(VMM exits as exits/*, hypercalls/*, and the engine's own counters; {SHOWN_PER_OP} or more per operation)"
    );
    for b in benches {
        if b.results.iter().all(|c| c.unavailable.is_some()) {
            continue;
        }
        let _ = writeln!(s, "{}", b.name);
        for &i in &shown {
            let c = &b.results[i];
            if c.unavailable.is_none() {
                let _ = writeln!(s, "  {:<14} {}", cols[i].label(), mechanism(c));
            }
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_lines() {
        assert_eq!(
            parse_line(
                "bench: name=in mode=pv iterations=100 cycles_per_op=651.91 ns_per_op=250.5"
            ),
            Some((
                "in".into(),
                Line::Measured {
                    mode: "pv".into(),
                    iterations: 100,
                    cycles: 651.91,
                    ns: Some(250.5)
                }
            ))
        );
        assert_eq!(
            parse_line("bench: name=call/ret mode=native iterations=3 cycles_per_op=1.00 ns_per_op=unknown"),
            Some((
                "call/ret".into(),
                Line::Measured {
                    mode: "native".into(),
                    iterations: 3,
                    cycles: 1.0,
                    ns: None
                }
            ))
        );
        assert_eq!(
            parse_line(
                "bench: name=in mode=pv unavailable=a deprivileged PV kernel has no port I/O"
            ),
            Some((
                "in".into(),
                Line::Unavailable {
                    mode: "pv".into(),
                    why: "a deprivileged PV kernel has no port I/O".into()
                }
            ))
        );
        for bad in [
            "bench: tsc_khz=1000000 iterations=100",
            "bench: name=in mode=pv iterations=0 cycles_per_op=1 ns_per_op=1",
            "bench: name=in mode=pv iterations=x cycles_per_op=1 ns_per_op=1",
            "demo: name=in mode=pv iterations=1 cycles_per_op=1 ns_per_op=1",
        ] {
            assert_eq!(parse_line(bad), None, "{bad}");
        }
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    /// Cells take medians over the runs, divide the phase's counters by the
    /// iterations, and say why a benchmark has no number.
    #[test]
    fn cells_and_table() {
        let run = |ns: f64, traps: u64| {
            let mut r = parse_output(&format!(
                "bench: name=cr8wr mode=native iterations=100 cycles_per_op={ns} ns_per_op={ns}\r\n\
                 bench: name=hypercall mode=native unavailable=paravirtual mode only\n"
            ));
            r.phases.insert(
                "cr8wr".into(),
                BTreeMap::from([("traps/mov to cr8".to_string(), traps)]),
            );
            r
        };
        let mut cols = columns(Some("trap,emu")).unwrap();
        assert_eq!(
            cols.iter().map(Column::label).collect::<Vec<_>>(),
            ["trap/native", "emu/native", "emu/pv"]
        );
        cols[0].runs = vec![run(300.0, 100), run(100.0, 100), run(200.0, 101)];
        cols[1].runs = vec![run(50.0, 0)];
        cols[2].runs = vec![Run {
            failure: Some("timed out (exit status 8)".into()),
            ..Run::default()
        }];
        let benches = cells(&cols);
        assert_eq!(benches.len(), abi::bench::NAMES.len());
        let cr8wr = &benches[abi::bench::CR8WR as usize - 1];
        assert_eq!(cr8wr.name, "cr8wr");
        let trap = &cr8wr.results[0];
        assert_eq!(trap.ns_per_op, Some(200.0));
        assert_eq!(trap.ratio, Some(4.0));
        assert_eq!(trap.per_op["traps/mov to cr8"], 1.0);
        assert_eq!(cr8wr.results[1].ratio, Some(1.0));
        assert_eq!(cr8wr.results[1].per_op["traps/mov to cr8"], 0.0);
        assert!(cr8wr.results[2]
            .unavailable
            .as_deref()
            .unwrap()
            .contains("timed out"));
        let hc = &benches[abi::bench::HYPERCALL as usize - 1].results[0];
        assert_eq!(hc.unavailable.as_deref(), Some("paravirtual mode only"));
        let t = table("demo OS", 3, &cols, &benches);
        assert!(t.contains("200 (4.0x)"), "{t}");
        assert!(t.contains("] paravirtual mode only"), "{t}");
        assert!(t.contains("the run failed: timed out"), "{t}");
        assert!(
            !t.contains("\ncpuid\n"),
            "no mechanism without a measurement: {t}"
        );
        assert!(t.contains("trap/native    1.00 traps/mov to cr8"), "{t}");
    }

    #[test]
    fn unknown_engine() {
        let e = columns(Some("emu,warp")).err().unwrap();
        assert!(e.contains("unknown engine \"warp\""), "{e}");
    }
}
