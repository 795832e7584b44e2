//! The PNG: throughput bars with their ranges, and latency p50/p99 bars, both annotated with
//! the ratio to their baseline.
//!
//! Text is drawn with a font loaded at run time (DejaVu Sans, Debian's `fonts-dejavu-core`),
//! so the chart needs no system font libraries at build time.

use crate::harness::Case;
use crate::report::{Row, Summary, fmt_ratio, human_bytes};
use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

const FONTS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

const WIDTH: u32 = 1600;
const HEIGHT: u32 = 760;

fn short(case: Case) -> &'static str {
    match case {
        Case::Pipe => "a: pipe",
        Case::Socat => "b: socat",
        Case::TubeRedis => "c: redis",
        Case::TubeRelay => "d: relay",
        Case::TubeZstd => "e: zstd",
        Case::SocatDelay => "f: socat+d",
        Case::TubeDelay => "f: redis+d",
        Case::TubeDelayWide => "f: redis+d 256M",
    }
}

fn color(case: Case) -> RGBColor {
    match case {
        Case::Pipe => RGBColor(150, 150, 150),
        Case::Socat | Case::SocatDelay => RGBColor(90, 110, 140),
        _ => RGBColor(220, 120, 40),
    }
}

fn load_font() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|p| Path::new(p).is_file())
        .context("no DejaVu Sans font for the chart (apt-get install -y fonts-dejavu-core)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// Draws `summary` into a PNG at `path`.
pub fn draw(summary: &Summary, path: &Path) -> Result<()> {
    load_font()?;
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let title = format!(
        "tube benchmark: {} per run, median of {}; latency: {} x {} B at {}/s; ratios to the socat chain",
        human_bytes(summary.size_bytes),
        summary.runs,
        summary.messages,
        summary.message_size,
        summary.rate
    );
    let root = root
        .titled(&title, ("sans-serif", 22))
        .map_err(|e| anyhow!("{e}"))?;
    let (left, right) = root.split_horizontally(WIDTH / 2);
    throughput(&left, &summary.rows).map_err(|e| anyhow!("throughput chart: {e}"))?;
    latency(&right, &summary.rows).map_err(|e| anyhow!("latency chart: {e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// A label centred above the point it is drawn at.
fn centered(size: u32) -> TextStyle<'static> {
    TextStyle::from(("sans-serif", size).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom))
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn throughput(area: &DrawingArea<BitMapBackend<'_>, Shift>, rows: &[Row]) -> DrawResult {
    let n = rows.len() as i32;
    let top = rows
        .iter()
        .filter_map(|r| r.throughput.map(|t| t.max_mb_per_s))
        .fold(1.0, f64::max)
        * 1.18;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "Throughput (MB/s, bar: median, line: min-max)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows
                .get(*i as usize)
                .map_or(String::new(), |r| short(r.case).into()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_label_style(("sans-serif", 15))
        .y_label_style(("sans-serif", 14))
        .y_desc("MB/s")
        .draw()?;
    let label = 15;
    // The targets for tube: 0.8x and 0.9x of the socat chain.
    let socat = rows
        .iter()
        .find(|r| r.case == Case::Socat)
        .and_then(|r| r.throughput);
    if let Some(b) = socat {
        for (k, name) in [
            (0.8, "0.8x (b): redis target"),
            (0.9, "0.9x (b): relay target"),
        ] {
            let y = b.median_mb_per_s * k;
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(SegmentValue::Exact(0), y), (SegmentValue::Exact(n), y)],
                RED.mix(0.6).stroke_width(1),
            )))?;
            chart.draw_series(std::iter::once(Text::new(
                name.to_string(),
                (SegmentValue::Exact(n - 1), y),
                TextStyle::from(("sans-serif", 12).into_font())
                    .color(&RED)
                    .pos(Pos::new(HPos::Left, VPos::Bottom)),
            )))?;
        }
    }
    for (i, r) in rows.iter().enumerate() {
        let i = i as i32;
        let Some(t) = r.throughput else {
            let word = if r.status.starts_with("n/a") {
                "n/a"
            } else {
                "failed"
            };
            chart.draw_series(std::iter::once(Text::new(
                word.to_string(),
                (SegmentValue::CenterOf(i), top * 0.03),
                centered(label),
            )))?;
            continue;
        };
        let mut bar = Rectangle::new(
            [
                (SegmentValue::Exact(i), 0.0),
                (SegmentValue::Exact(i + 1), t.median_mb_per_s),
            ],
            color(r.case).filled(),
        );
        bar.set_margin(0, 0, 10, 10);
        chart.draw_series(std::iter::once(bar))?;
        chart.draw_series(std::iter::once(PathElement::new(
            vec![
                (SegmentValue::CenterOf(i), t.min_mb_per_s),
                (SegmentValue::CenterOf(i), t.max_mb_per_s),
            ],
            BLACK.stroke_width(2),
        )))?;
        let mut text = format!("{:.0}", t.median_mb_per_s);
        if let Some(x) = r.throughput_ratio {
            text = format!("{text} ({})", fmt_ratio(Some(x)));
        }
        chart.draw_series(std::iter::once(Text::new(
            text,
            (
                SegmentValue::CenterOf(i),
                t.max_mb_per_s.max(t.median_mb_per_s) + top * 0.01,
            ),
            centered(label),
        )))?;
    }
    Ok(())
}

fn latency(area: &DrawingArea<BitMapBackend<'_>, Shift>, rows: &[Row]) -> DrawResult {
    let n = rows.len() as i32;
    let lats: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.latency)
        .flat_map(|l| [l.p50_ms, l.p99_ms])
        .collect();
    let low = lats.iter().copied().fold(f64::INFINITY, f64::min).min(1.0) / 3.0;
    let low = if low.is_finite() && low > 0.0 {
        low
    } else {
        0.01
    };
    let high = lats.iter().copied().fold(1.0, f64::max) * 4.0;
    let mut chart = ChartBuilder::on(area)
        .caption(
            "One-way latency (ms, log scale; light: p50, dark: p99)",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0..n.max(2) - 1).into_segmented(), (low..high).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows
                .get(*i as usize)
                .map_or(String::new(), |r| short(r.case).into()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .x_label_style(("sans-serif", 15))
        .y_label_style(("sans-serif", 14))
        .y_desc("ms")
        .draw()?;
    let segment = (area.dim_in_pixel().0 as i32 - 70 - 24) / n.max(1);
    let gap = (segment / 10).max(2);
    let half = segment / 2;
    let label = 13;
    for (i, r) in rows.iter().enumerate() {
        let i = i as i32;
        let Some(l) = r.latency else {
            let word = if r.status.starts_with("n/a") {
                "n/a"
            } else {
                "failed"
            };
            chart.draw_series(std::iter::once(Text::new(
                word.to_string(),
                (SegmentValue::CenterOf(i), low * 1.3),
                centered(15),
            )))?;
            continue;
        };
        let base = color(r.case);
        let light = RGBColor(base.0 / 2 + 127, base.1 / 2 + 127, base.2 / 2 + 127);
        let mut p50 = Rectangle::new(
            [
                (SegmentValue::Exact(i), low),
                (SegmentValue::Exact(i + 1), l.p50_ms),
            ],
            light.filled(),
        );
        p50.set_margin(0, 0, gap as u32, (half + 1) as u32);
        let mut p99 = Rectangle::new(
            [
                (SegmentValue::Exact(i), low),
                (SegmentValue::Exact(i + 1), l.p99_ms),
            ],
            base.filled(),
        );
        p99.set_margin(0, 0, (half + 1) as u32, gap as u32);
        chart.draw_series([p50, p99])?;
        let text = match r.p99_ratio {
            Some(x) => format!("{:.2} ({})", l.p99_ms, fmt_ratio(Some(x))),
            None => format!("{:.2}", l.p99_ms),
        };
        chart.draw_series(std::iter::once(Text::new(
            text,
            (SegmentValue::CenterOf(i), l.p99_ms * 1.08),
            centered(label),
        )))?;
    }
    Ok(())
}
