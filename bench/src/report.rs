//! Statistics, the targets of issue 5, the table, CSV and JSON.

use crate::RunArgs;
use crate::harness::Case;
use anyhow::{Context, Result};
use serde::Serialize;
use std::fmt::Write as _;
use std::path::Path;

/// Peak RSS allowed for a tube writer and for a tube reader.
const ENDPOINT_RSS_LIMIT_MIB: f64 = 32.0;
/// Peak RSS a tube relay may use beyond its backlog bound.
const RELAY_RSS_SLACK_MIB: f64 = 32.0;

/// One throughput run of one case.
#[derive(Debug, Clone, Serialize)]
pub struct ThroughputRun {
    pub secs: f64,
    pub mb_per_s: f64,
    pub writer_rss_kib: Option<u64>,
    pub reader_rss_kib: Option<u64>,
    pub relay_rss_kib: Option<u64>,
    /// CPU seconds (user + system) of each role over the run.
    pub writer_cpu_s: Option<f64>,
    pub reader_cpu_s: Option<f64>,
    pub relay_cpu_s: Option<f64>,
}

/// Median and range of a case's throughput runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ThroughputStats {
    pub median_mb_per_s: f64,
    pub min_mb_per_s: f64,
    pub max_mb_per_s: f64,
    pub runs: usize,
}

/// One-way latency of a case.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct LatencyStats {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub samples: usize,
}

impl LatencyStats {
    pub fn from_ns(samples: &[u64]) -> Self {
        let mut s = samples.to_vec();
        s.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        Self {
            p50_ms: ms(percentile(&s, 0.50)),
            p99_ms: ms(percentile(&s, 0.99)),
            max_ms: ms(s.last().copied().unwrap_or(0)),
            samples: s.len(),
        }
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Everything measured for one case.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub case: Case,
    /// Why the case was not run (a feature tube does not have yet).
    pub unavailable: Option<String>,
    pub throughput_runs: Vec<Result<ThroughputRun, String>>,
    /// `None` when latency was not measured.
    pub latency: Option<Result<LatencyStats, String>>,
    /// CPU seconds (user + system) of the writer, the reader and the relay in each latency
    /// run, start included.
    pub latency_cpu_s: Vec<[Option<f64>; 3]>,
}

impl CaseResult {
    pub fn new(case: Case) -> Self {
        Self {
            case,
            unavailable: None,
            throughput_runs: Vec::new(),
            latency: None,
            latency_cpu_s: Vec::new(),
        }
    }

    fn ok_runs(&self) -> impl Iterator<Item = &ThroughputRun> {
        self.throughput_runs.iter().filter_map(|r| r.as_ref().ok())
    }

    fn throughput_error(&self) -> Option<String> {
        let failed: Vec<&String> = self
            .throughput_runs
            .iter()
            .filter_map(|r| r.as_ref().err())
            .collect();
        failed.first().map(|e| {
            format!(
                "{} of {} runs failed: {e}",
                failed.len(),
                self.throughput_runs.len()
            )
        })
    }

    /// Throughput statistics, only when every run succeeded.
    pub fn throughput(&self) -> Option<ThroughputStats> {
        if self.throughput_runs.is_empty() || self.throughput_error().is_some() {
            return None;
        }
        let v: Vec<f64> = self.ok_runs().map(|r| r.mb_per_s).collect();
        Some(ThroughputStats {
            median_mb_per_s: median(&v),
            min_mb_per_s: v.iter().copied().fold(f64::INFINITY, f64::min),
            max_mb_per_s: v.iter().copied().fold(0.0, f64::max),
            runs: v.len(),
        })
    }

    pub fn latency(&self) -> Option<LatencyStats> {
        self.latency.as_ref()?.as_ref().ok().copied()
    }

    fn peak_mib(&self, pick: fn(&ThroughputRun) -> Option<u64>) -> Option<f64> {
        self.ok_runs()
            .filter_map(pick)
            .max()
            .map(|kib| kib as f64 / 1024.0)
    }

    pub fn writer_rss_mib(&self) -> Option<f64> {
        self.peak_mib(|r| r.writer_rss_kib)
    }

    pub fn reader_rss_mib(&self) -> Option<f64> {
        self.peak_mib(|r| r.reader_rss_kib)
    }

    pub fn relay_rss_mib(&self) -> Option<f64> {
        self.peak_mib(|r| r.relay_rss_kib)
    }

    /// Median CPU seconds per GiB moved for one role.
    fn cpu_per_gib(&self, pick: fn(&ThroughputRun) -> Option<f64>, size: u64) -> Option<f64> {
        let v: Vec<f64> = self
            .ok_runs()
            .filter_map(pick)
            .map(|s| s * (1u64 << 30) as f64 / size as f64)
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    /// Median CPU microseconds per latency message of one role (0 writer, 1 reader, 2 relay).
    ///
    /// Whole processes, so a process's start and idle wake-ups are spread over its messages;
    /// that is a few percent of the figure with 1,000 messages, and the same for every case.
    fn cpu_per_message(&self, role: usize, messages: u32) -> Option<f64> {
        if self.latency().is_none() || messages == 0 {
            return None;
        }
        let v: Vec<f64> = self
            .latency_cpu_s
            .iter()
            .filter_map(|run| run[role])
            .map(|s| s * 1e6 / f64::from(messages))
            .collect();
        (!v.is_empty()).then(|| median(&v))
    }

    /// What went wrong, for the table and the JSON.
    pub fn status(&self) -> String {
        if let Some(why) = &self.unavailable {
            return format!("n/a: {why}");
        }
        let mut problems = Vec::new();
        if let Some(e) = self.throughput_error() {
            problems.push(format!("throughput: {e}"));
        }
        if let Some(Err(e)) = &self.latency {
            problems.push(format!("latency: {e}"));
        }
        if problems.is_empty() {
            "ok".into()
        } else {
            format!("FAILED: {}", problems.join("; "))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    #[serde(rename = "PASS")]
    Pass,
    #[serde(rename = "FAIL")]
    Fail,
    #[serde(rename = "N/A")]
    NotAvailable,
}

/// One target of the issue and how this run did.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub verdict: Verdict,
    /// The measured value (a ratio, or MiB).
    pub value: Option<f64>,
    pub limit: f64,
    pub detail: String,
}

/// One row of results.csv / results.json.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub case: Case,
    pub label: &'static str,
    pub status: String,
    pub throughput: Option<ThroughputStats>,
    pub throughput_runs_mb_per_s: Vec<f64>,
    pub throughput_ratio: Option<f64>,
    pub latency: Option<LatencyStats>,
    pub p50_ratio: Option<f64>,
    pub p99_ratio: Option<f64>,
    pub writer_rss_mib: Option<f64>,
    pub reader_rss_mib: Option<f64>,
    pub relay_rss_mib: Option<f64>,
    /// CPU seconds (user + system) per GiB moved, median over the runs.
    pub writer_cpu_s_per_gib: Option<f64>,
    pub reader_cpu_s_per_gib: Option<f64>,
    pub relay_cpu_s_per_gib: Option<f64>,
    /// CPU microseconds (user + system) per latency message, start included, median over
    /// the latency runs.
    pub writer_cpu_us_per_msg: Option<f64>,
    pub reader_cpu_us_per_msg: Option<f64>,
    pub relay_cpu_us_per_msg: Option<f64>,
}

/// The whole run, ready to print, save and draw.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub size_bytes: u64,
    pub runs: u32,
    pub messages: u32,
    pub message_size: u32,
    pub rate: u32,
    pub delay_ms: u64,
    pub relay_max_memory_bytes: u64,
    /// Extra `tube write` arguments of this run (empty: tube's defaults).
    pub write_args: String,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
}

impl Summary {
    pub fn new(args: &RunArgs, relay_max_memory: u64, results: Vec<CaseResult>) -> Self {
        let find = |c: Case| results.iter().find(|r| r.case == c);
        let ratio = |c: Case, f: &dyn Fn(&CaseResult) -> Option<f64>| -> Option<f64> {
            let base = find(c.baseline()?)?;
            Some(f(find(c)?)? / f(base)?)
        };
        let thr = |r: &CaseResult| r.throughput().map(|t| t.median_mb_per_s);
        let p50 = |r: &CaseResult| r.latency().map(|l| l.p50_ms);
        let p99 = |r: &CaseResult| r.latency().map(|l| l.p99_ms);
        let rows: Vec<Row> = results
            .iter()
            .map(|r| Row {
                case: r.case,
                label: r.case.label(),
                status: r.status(),
                throughput: r.throughput(),
                throughput_runs_mb_per_s: r.ok_runs().map(|t| t.mb_per_s).collect(),
                throughput_ratio: ratio(r.case, &thr),
                latency: r.latency(),
                p50_ratio: ratio(r.case, &p50),
                p99_ratio: ratio(r.case, &p99),
                writer_rss_mib: r.writer_rss_mib(),
                reader_rss_mib: r.reader_rss_mib(),
                relay_rss_mib: r.relay_rss_mib(),
                writer_cpu_s_per_gib: r.cpu_per_gib(|t| t.writer_cpu_s, args.size),
                reader_cpu_s_per_gib: r.cpu_per_gib(|t| t.reader_cpu_s, args.size),
                relay_cpu_s_per_gib: r.cpu_per_gib(|t| t.relay_cpu_s, args.size),
                writer_cpu_us_per_msg: r.cpu_per_message(0, args.messages),
                reader_cpu_us_per_msg: r.cpu_per_message(1, args.messages),
                relay_cpu_us_per_msg: r.cpu_per_message(2, args.messages),
            })
            .collect();

        let mut targets = Vec::new();
        // A target on a ratio of `case` to its baseline.
        let mut ratio_target = |name: String,
                                case: Case,
                                value: Option<f64>,
                                limit: f64,
                                at_least: bool,
                                measured: bool| {
            let why_not = [Some(case), case.baseline()]
                .into_iter()
                .flatten()
                .find_map(|c| match find(c) {
                    None => Some((true, format!("{} was not run", c.name()))),
                    Some(r) if r.unavailable.is_some() => Some((true, r.status())),
                    Some(r) if r.status() != "ok" => {
                        Some((false, format!("{}: {}", c.name(), r.status())))
                    }
                    Some(_) => None,
                });
            let (verdict, detail) = match (value, why_not) {
                _ if !measured => (
                    Verdict::NotAvailable,
                    "not measured in this run".to_string(),
                ),
                (_, Some((true, why))) => (Verdict::NotAvailable, why),
                (Some(v), None) => {
                    let ok = if at_least { v >= limit } else { v <= limit };
                    (
                        if ok { Verdict::Pass } else { Verdict::Fail },
                        String::new(),
                    )
                }
                (_, why) => (
                    Verdict::Fail,
                    why.map_or_else(|| "no value".into(), |w| w.1),
                ),
            };
            targets.push(Target {
                name,
                verdict,
                value,
                limit,
                detail,
            });
        };
        let thr_on = !args.no_throughput;
        let lat_on = !args.no_latency;
        ratio_target(
            "throughput via tube relay >= 0.9x socat chain".into(),
            Case::TubeRelay,
            ratio(Case::TubeRelay, &thr),
            0.9,
            true,
            thr_on,
        );
        ratio_target(
            "throughput via redis-server >= 0.8x socat chain".into(),
            Case::TubeRedis,
            ratio(Case::TubeRedis, &thr),
            0.8,
            true,
            thr_on,
        );
        ratio_target(
            "latency p99 via tube relay <= 1.3x socat chain".into(),
            Case::TubeRelay,
            ratio(Case::TubeRelay, &p99),
            1.3,
            false,
            lat_on,
        );
        ratio_target(
            "latency p99 via redis-server <= 2x socat chain".into(),
            Case::TubeRedis,
            ratio(Case::TubeRedis, &p99),
            2.0,
            false,
            lat_on,
        );
        ratio_target(
            format!(
                "throughput through +{} ms proxy: tube >= 0.5x socat chain",
                args.delay_ms
            ),
            Case::TubeDelay,
            ratio(Case::TubeDelay, &thr),
            0.5,
            true,
            thr_on,
        );
        ratio_target(
            format!(
                "throughput through +{} ms proxy, --max-backlog 256M: tube >= 0.5x socat chain",
                args.delay_ms
            ),
            Case::TubeDelayWide,
            ratio(Case::TubeDelayWide, &thr),
            0.5,
            true,
            thr_on,
        );

        // Memory: the worst tube writer and reader over every tube case that ran, but the
        // wide-backlog one, which holds more in flight by design.
        let on = if args.size == 1 << 30 {
            "the 1 GiB transfer".to_string()
        } else {
            format!("a {} transfer, not 1 GiB", human_bytes(args.size))
        };
        for (role, pick) in [
            (
                "writer",
                CaseResult::writer_rss_mib as fn(&CaseResult) -> Option<f64>,
            ),
            ("reader", CaseResult::reader_rss_mib),
        ] {
            let worst = results
                .iter()
                .filter(|r| r.case.in_rss_targets())
                .filter_map(|r| pick(r).map(|m| (m, r.case.name())))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let counted_ran = results
                .iter()
                .any(|r| r.case.in_rss_targets() && r.unavailable.is_none());
            let (verdict, value, detail) = match worst {
                _ if !thr_on => (
                    Verdict::NotAvailable,
                    None,
                    "not measured in this run".into(),
                ),
                None if !counted_ran => (
                    Verdict::NotAvailable,
                    None,
                    format!(
                        "no tube case counted here was run ({} does not count)",
                        Case::TubeDelayWide.name()
                    ),
                ),
                Some((m, case)) => (
                    if m <= ENDPOINT_RSS_LIMIT_MIB {
                        Verdict::Pass
                    } else {
                        Verdict::Fail
                    },
                    Some(m),
                    format!("worst: {case}, on {on}"),
                ),
                None => (Verdict::Fail, None, "no tube case finished".into()),
            };
            targets.push(Target {
                name: format!("tube {role} peak RSS <= {ENDPOINT_RSS_LIMIT_MIB} MiB (MiB)"),
                verdict,
                value,
                limit: ENDPOINT_RSS_LIMIT_MIB,
                detail,
            });
        }
        let bound_mib = relay_max_memory as f64 / (1 << 20) as f64;
        let limit = bound_mib + RELAY_RSS_SLACK_MIB;
        let relay = find(Case::TubeRelay);
        let (verdict, value, detail) = match relay {
            _ if !thr_on => (
                Verdict::NotAvailable,
                None,
                "not measured in this run".into(),
            ),
            None => (Verdict::NotAvailable, None, "tube-relay was not run".into()),
            Some(r) if r.unavailable.is_some() => (Verdict::NotAvailable, None, r.status()),
            Some(r) => match r.relay_rss_mib() {
                Some(m) => (
                    if m <= limit {
                        Verdict::Pass
                    } else {
                        Verdict::Fail
                    },
                    Some(m),
                    format!("--max-memory {}, on {on}", human_bytes(relay_max_memory)),
                ),
                None => (Verdict::Fail, None, r.status()),
            },
        };
        targets.push(Target {
            name: format!("tube relay peak RSS <= backlog bound + {RELAY_RSS_SLACK_MIB} MiB (MiB)"),
            verdict,
            value,
            limit,
            detail,
        });

        Self {
            size_bytes: args.size,
            runs: args.runs,
            messages: args.messages,
            message_size: args.message_size,
            rate: args.rate,
            delay_ms: args.delay_ms,
            relay_max_memory_bytes: relay_max_memory,
            write_args: args.write_args.clone(),
            rows,
            targets,
        }
    }

    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "\nThroughput: {} per run, median of {} (min-max), MB = 10^6 bytes. Latency: {} messages of {} B at {}/s, one-way.",
            human_bytes(self.size_bytes),
            self.runs,
            self.messages,
            self.message_size,
            self.rate
        );
        let _ = writeln!(
            t,
            "Ratios are to (b) the socat chain (for the +{} ms cases: to the socat chain through the same proxy). RSS: peak, MiB.\n",
            self.delay_ms
        );
        if !self.write_args.is_empty() {
            let _ = writeln!(t, "tube write runs with: {}\n", self.write_args);
        }
        let _ = writeln!(
            t,
            "{:<27} {:>8} {:>17} {:>7} | {:>8} {:>8} {:>8} {:>6} {:>6} | {:>6} {:>6} {:>7}",
            "case",
            "MB/s",
            "(min-max)",
            "x(b)",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p50x",
            "p99x",
            "writer",
            "reader",
            "relay"
        );
        let _ = writeln!(t, "{}", "-".repeat(129));
        for r in &self.rows {
            let (mbps, range) = match &r.throughput {
                Some(s) => (
                    format!("{:.0}", s.median_mb_per_s),
                    format!("({:.0}-{:.0})", s.min_mb_per_s, s.max_mb_per_s),
                ),
                None => (na(&r.status), String::new()),
            };
            let (p50, p99, max) = match &r.latency {
                Some(l) => (ms(l.p50_ms), ms(l.p99_ms), ms(l.max_ms)),
                None => (na(&r.status), String::new(), String::new()),
            };
            let _ = writeln!(
                t,
                "{:<27} {:>8} {:>17} {:>7} | {:>8} {:>8} {:>8} {:>6} {:>6} | {:>6} {:>6} {:>7}",
                r.label,
                mbps,
                range,
                fmt_ratio(r.throughput_ratio),
                p50,
                p99,
                max,
                fmt_ratio(r.p50_ratio),
                fmt_ratio(r.p99_ratio),
                fmt_mib(r.writer_rss_mib),
                fmt_mib(r.reader_rss_mib),
                fmt_mib(r.relay_rss_mib),
            );
        }
        let _ = writeln!(
            t,
            "\nCPU seconds (user+sys) per GiB moved, median over the throughput runs:"
        );
        let per_gib: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.writer_cpu_s_per_gib.is_some())
            .collect();
        cpu_rows(
            &mut t,
            &per_gib,
            |r| {
                [
                    r.writer_cpu_s_per_gib,
                    r.reader_cpu_s_per_gib,
                    r.relay_cpu_s_per_gib,
                ]
            },
            2,
        );
        let per_message: Vec<&Row> = self
            .rows
            .iter()
            .filter(|r| r.writer_cpu_us_per_msg.is_some())
            .collect();
        if !per_message.is_empty() {
            let _ = writeln!(
                t,
                "\nCPU microseconds (user+sys) per latency message, whole processes, median over the latency runs:"
            );
            cpu_rows(
                &mut t,
                &per_message,
                |r| {
                    [
                        r.writer_cpu_us_per_msg,
                        r.reader_cpu_us_per_msg,
                        r.relay_cpu_us_per_msg,
                    ]
                },
                1,
            );
        }
        let notes: Vec<&Row> = self.rows.iter().filter(|r| r.status != "ok").collect();
        if !notes.is_empty() {
            let _ = writeln!(t);
            for r in notes {
                let _ = writeln!(t, "{}: {}", r.case.name(), r.status);
            }
        }
        let _ = writeln!(t, "\nTargets:");
        let width = self
            .targets
            .iter()
            .map(|x| x.name.len())
            .fold(62, usize::max);
        for x in &self.targets {
            let verdict = match x.verdict {
                Verdict::Pass => "PASS",
                Verdict::Fail => "FAIL",
                Verdict::NotAvailable => "N/A ",
            };
            let value = x.value.map_or("-".to_string(), |v| format!("{v:.2}"));
            let detail = if x.detail.is_empty() {
                String::new()
            } else {
                format!("  ({})", x.detail)
            };
            let _ = writeln!(t, "  {verdict}  {:<width$} {value:>8}{detail}", x.name);
        }
        t
    }

    /// results.csv and results.json in `dir`.
    pub fn write_files(&self, dir: &Path) -> Result<()> {
        let mut csv = String::from(
            "case,label,status,mb_per_s_median,mb_per_s_min,mb_per_s_max,throughput_ratio,\
latency_p50_ms,latency_p99_ms,latency_max_ms,p50_ratio,p99_ratio,writer_rss_mib,reader_rss_mib,relay_rss_mib,\
writer_cpu_s_per_gib,reader_cpu_s_per_gib,relay_cpu_s_per_gib,\
writer_cpu_us_per_msg,reader_cpu_us_per_msg,relay_cpu_us_per_msg\n",
        );
        let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.4}"));
        for r in &self.rows {
            let t = r.throughput.as_ref();
            let l = r.latency.as_ref();
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                r.case.name(),
                quote(r.label),
                quote(&r.status),
                num(t.map(|t| t.median_mb_per_s)),
                num(t.map(|t| t.min_mb_per_s)),
                num(t.map(|t| t.max_mb_per_s)),
                num(r.throughput_ratio),
                num(l.map(|l| l.p50_ms)),
                num(l.map(|l| l.p99_ms)),
                num(l.map(|l| l.max_ms)),
                num(r.p50_ratio),
                num(r.p99_ratio),
                num(r.writer_rss_mib),
                num(r.reader_rss_mib),
                num(r.relay_rss_mib),
                num(r.writer_cpu_s_per_gib),
                num(r.reader_cpu_s_per_gib),
                num(r.relay_cpu_s_per_gib),
                num(r.writer_cpu_us_per_msg),
                num(r.reader_cpu_us_per_msg),
                num(r.relay_cpu_us_per_msg),
            );
        }
        let csv_path = dir.join("results.csv");
        std::fs::write(&csv_path, csv)
            .with_context(|| format!("cannot write {}", csv_path.display()))?;
        let json_path = dir.join("results.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("cannot write {}", json_path.display()))?;
        Ok(())
    }
}

/// A table of CPU figures per role with their sum, to `decimals` places.
fn cpu_rows(t: &mut String, rows: &[&Row], pick: fn(&Row) -> [Option<f64>; 3], decimals: usize) {
    let _ = writeln!(
        t,
        "{:<27} {:>7} {:>7} {:>7} {:>7}",
        "case", "writer", "reader", "relay", "sum"
    );
    let cpu = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.decimals$}"));
    for r in rows {
        let parts = pick(r);
        let sum = parts.iter().try_fold(0.0, |a, v| v.map(|v| a + v));
        let _ = writeln!(
            t,
            "{:<27} {:>7} {:>7} {:>7} {:>7}",
            r.label,
            cpu(parts[0]),
            cpu(parts[1]),
            cpu(parts[2]),
            cpu(sum)
        );
    }
}

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn na(status: &str) -> String {
    if status.starts_with("n/a") {
        "n/a".into()
    } else if status == "ok" {
        "-".into()
    } else {
        "FAILED".into()
    }
}

fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.3}")
    } else {
        format!("{v:.1}")
    }
}

pub fn fmt_ratio(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.2}x"))
}

fn fmt_mib(v: Option<f64>) -> String {
    v.map_or(String::new(), |v| format!("{v:.1}"))
}

pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 && n % (1 << 30) == 0 => format!("{} GiB", n >> 30),
        n if n >= 1 << 20 => format!("{:.0} MiB", n as f64 / (1 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.0} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.5), 0);
    }

    #[test]
    fn cpu_per_message_is_the_median_over_runs_and_needs_latency() {
        let mut r = CaseResult::new(Case::TubeRelay);
        r.latency_cpu_s = vec![
            [Some(0.05), Some(0.04), Some(0.09)],
            [Some(0.07), None, Some(0.03)],
            [Some(0.06), Some(0.02), Some(0.05)],
        ];
        // Without latency statistics (a failed run) there is no figure.
        assert_eq!(r.cpu_per_message(0, 1000), None);
        r.latency = Some(Ok(LatencyStats::from_ns(&[1, 2, 3])));
        let us = |v: Option<f64>| v.map(|v| (v * 1000.0).round() / 1000.0);
        assert_eq!(us(r.cpu_per_message(0, 1000)), Some(60.0));
        // A run without the figure is left out, not counted as zero.
        assert_eq!(us(r.cpu_per_message(1, 1000)), Some(30.0));
        assert_eq!(us(r.cpu_per_message(2, 1000)), Some(50.0));
        assert_eq!(r.cpu_per_message(2, 0), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
