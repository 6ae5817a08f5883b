// SPDX-License-Identifier: Apache-2.0
//! The plot: one migration of each monitor side by side, pre-copy rounds over time (the pages
//! each round had to send) and the bytes sent so far.

use std::path::Path;

use plotters::prelude::*;

use crate::migrate::Sample;

/// Where the font comes from (Debian's `fonts-dejavu-core`, which the setup script installs).
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

pub fn migrations(path: &Path, title: &str, samples: &[&Sample]) -> Result<(), String> {
    let font = std::fs::read(FONT).map_err(|e| format!("{FONT}: {e} (apt-get install fonts-dejavu-core)"))?;
    // plotters keeps the font for the rest of the process.
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| format!("{FONT}: not a usable font"))?;
    draw(path, title, samples).map_err(|e| format!("drawing {}: {e}", path.display()))
}

const SIZE: (u32, u32) = (1400, 560);

fn draw(path: &Path, title: &str, samples: &[&Sample]) -> Result<(), Box<dyn std::error::Error>> {
    let mut rgb = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    render(&mut rgb, title, samples)?;
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut encoder = png::Encoder::new(file, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    // A plot is mostly flat colour: the best compression and adaptive filters make the file
    // several times smaller (it is committed with the README) at no visible cost.
    encoder.set_compression(png::Compression::Best);
    encoder.set_adaptive_filter(png::AdaptiveFilterType::Adaptive);
    encoder.write_header()?.write_image_data(&rgb)?;
    Ok(())
}

fn render(rgb: &mut [u8], title: &str, samples: &[&Sample]) -> Result<(), Box<dyn std::error::Error>> {
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
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
