// SPDX-License-Identifier: Apache-2.0
//! The plots: one migration of each monitor side by side, pre-copy rounds over time (the pages
//! each round had to send) and the bytes sent so far; and each host's load over time during the
//! cluster's parallel-jobs run with the balancer, every migration marked.

use std::path::Path;

use plotters::prelude::*;

use crate::migrate::Sample;

/// Where the font comes from (Debian's `fonts-dejavu-core`, which the setup script installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Reads the font and hands it to plotters, once per process.
fn font() -> Result<(), String> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (apt-get install fonts-dejavu-core)"))?;
            // plotters keeps the font for the rest of the process.
            let font: &'static [u8] = Box::leak(font.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, font)
                .map_err(|_| format!("{FONT}: not a usable font"))
        })
        .clone()
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

pub fn migrations(path: &Path, title: &str, samples: &[&Sample]) -> Result<(), String> {
    font()?;
    png_file(path, SIZE, |rgb| render(rgb, title, samples)).map_err(|e| format!("drawing {}: {e}", path.display()))
}

/// One host's load over time: (seconds since the start, demand ÷ capacity), and what it used
/// (seconds, used ÷ capacity).
pub struct HostSeries {
    pub host: String,
    pub demand: Vec<(f64, f64)>,
    pub used: Vec<(f64, f64)>,
}

/// A migration: when it was seen to have happened (seconds since the start), and its label.
pub struct Mark {
    pub t: f64,
    pub label: String,
}

/// Each host's load over time, one line per host, a dashed vertical line at each migration;
/// below, what each host used.
pub fn host_loads(path: &Path, title: &str, hosts: &[HostSeries], marks: &[Mark]) -> Result<(), String> {
    font()?;
    png_file(path, LOADS_SIZE, |rgb| render_loads(rgb, title, hosts, marks))
        .map_err(|e| format!("drawing {}: {e}", path.display()))
}

const SIZE: (u32, u32) = (1400, 560);
const LOADS_SIZE: (u32, u32) = (1400, 900);

/// Renders a picture of `size` with `render` and writes it as a PNG.
fn png_file(path: &Path, size: (u32, u32), render: impl FnOnce(&mut [u8]) -> Drawn) -> Drawn {
    let mut rgb = vec![0u8; (size.0 * size.1 * 3) as usize];
    render(&mut rgb)?;
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, size.0, size.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // A plot is mostly flat colour: the best compression and adaptive filters make the file
    // several times smaller (it is committed with the README) at no visible cost.
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    encoder.write_header()?.write_image_data(&rgb)?;
    Ok(())
}

/// The series' legend, boxed, at `at`.
fn legend<'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>,
    at: SeriesLabelPosition,
) -> Drawn {
    chart
        .configure_series_labels()
        .position(at)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn render(rgb: &mut [u8], title: &str, samples: &[&Sample]) -> Drawn {
    let root = BitMapBackend::with_buffer(rgb, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 24))?;
    let panels = root.split_evenly((1, samples.len().max(1)));
    for (area, s) in panels.iter().zip(samples) {
        let r = &s.result;
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let x_max = r.timeline.iter().map(|p| p.t_ms).fold(r.total_ms, f64::max).max(1.0) * 1.05;
        let pages_max = r.timeline.iter().map(|p| p.dirty_pages).max().unwrap_or(0).max(1) as f64 * 1.1;
        let sent_max = mib(r.bytes_sent).max(0.01) * 1.1;
        let caption = format!(
            "{}: {:.0} ms, downtime {:.0} ms, {:.1} MiB, {} rounds",
            s.monitor.name(),
            r.total_ms,
            r.downtime_ms,
            mib(r.bytes_sent),
            r.rounds
        );
        let mut chart = ChartBuilder::on(area)
            .caption(caption, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(75)
            .right_y_label_area_size(65)
            .build_cartesian_2d(0f64..x_max, 0f64..pages_max)?
            .set_secondary_coord(0f64..x_max, 0f64..sent_max);
        chart
            .configure_mesh()
            .x_desc("time since the migration started (ms)")
            .y_desc("pages to send in the round")
            .label_style(("sans-serif", 14))
            .draw()?;
        chart.configure_secondary_axes().y_desc("MiB sent").label_style(("sans-serif", 14)).draw()?;
        let rounds: Vec<(f64, f64)> = r.timeline.iter().map(|p| (p.t_ms, p.dirty_pages as f64)).collect();
        chart
            .draw_series(LineSeries::new(rounds.clone(), BLUE.stroke_width(2)))?
            .label("pages to send, at each round's start")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart.draw_series(rounds.iter().map(|&p| Circle::new(p, 5, BLUE.filled())))?;
        let sent: Vec<(f64, f64)> = r
            .timeline
            .iter()
            .map(|p| (p.t_ms, mib(p.bytes_sent)))
            .chain(std::iter::once((r.total_ms, mib(r.bytes_sent))))
            .collect();
        chart
            .draw_secondary_series(LineSeries::new(sent, RED.stroke_width(2)))?
            .label("MiB sent so far")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    }
    root.present()?;
    Ok(())
}

const HOST_COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn render_loads(rgb: &mut [u8], title: &str, hosts: &[HostSeries], marks: &[Mark]) -> Drawn {
    let root = BitMapBackend::with_buffer(rgb, LOADS_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 22))?;
    let x_max = hosts.iter().flat_map(|h| h.demand.iter().chain(&h.used)).map(|p| p.0).fold(1.0, f64::max) * 1.02;
    let (top, bottom) = root.split_vertically(LOADS_SIZE.1 * 3 / 5);
    let demand = |h: &HostSeries| h.demand.clone();
    let used = |h: &HostSeries| h.used.clone();
    load_panel(&top, x_max, "CPU demand ÷ capacity (10 s average)", hosts, &demand, marks, true)?;
    load_panel(&bottom, x_max, "CPU used ÷ capacity (10 s average)", hosts, &used, marks, false)?;
    root.present()?;
    Ok(())
}

/// One panel of the hosts' load: a line per host (`series` picks which figure), a dashed line at
/// each migration, labelled if `labels`.
fn load_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    x_max: f64,
    y_desc: &str,
    hosts: &[HostSeries],
    series: &dyn Fn(&HostSeries) -> Vec<(f64, f64)>,
    marks: &[Mark],
    labels: bool,
) -> Drawn {
    let y_max = hosts.iter().flat_map(series).map(|p| p.1).fold(1.0, f64::max) * 1.1;
    let mut chart = ChartBuilder::on(area)
        .margin(14)
        .x_label_area_size(45)
        .y_label_area_size(75)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first job was created")
        .y_desc(y_desc)
        .label_style(("sans-serif", 14))
        .draw()?;
    let grey = RGBColor(90, 90, 90);
    for m in marks {
        // Dashes by hand: a short segment every 2 % of the height.
        let step = y_max / 50.0;
        let dash = |i: usize| PathElement::new(vec![(m.t, i as f64 * step), (m.t, (i as f64 + 1.0) * step)], grey);
        chart.draw_series((0..50).step_by(2).map(dash))?;
    }
    if labels {
        // Staggered, so that moves close in time stay readable.
        let label = |(i, m): (usize, &Mark)| {
            let y = y_max * (0.97 - 0.045 * (i % 8) as f64);
            Text::new(m.label.clone(), (m.t, y), ("sans-serif", 12).into_font().color(&grey))
        };
        chart.draw_series(marks.iter().enumerate().map(label))?;
    }
    for (h, colour) in hosts.iter().zip(HOST_COLOURS.iter().cycle()) {
        chart
            .draw_series(LineSeries::new(series(h), colour.stroke_width(2)))?
            .label(format!("host {}", h.host))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    Ok(())
}
