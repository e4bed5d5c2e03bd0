//! The SVG report: latency by percentile, and throughput and p99 over time.
//!
//! Drawn with plotters' SVG backend into one self-contained file: no scripts, fonts or images
//! are fetched, text is plain SVG text in the viewer's sans-serif font.

use plotters::prelude::*;

use crate::{Error, Report, format, report::TimelinePhase};

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 820;

/// The deepest percentile the curve's axis shows: 99.999%.
const MAX_NINES: f64 = 5.0;

/// The p99 line's colour: green, dark enough to read on white.
const DARK_GREEN: RGBColor = RGBColor(20, 140, 60);

fn render_error(e: impl std::fmt::Display) -> Error {
    Error::Render(e.to_string())
}

/// `-log10(1 - p)`: the "number of nines" of a percentile, the usual latency-curve axis.
fn nines(percentile: f64) -> f64 {
    let tail = 1.0 - percentile / 100.0;
    if tail <= 10f64.powf(-MAX_NINES) {
        MAX_NINES
    } else {
        -tail.log10()
    }
}

fn nines_label(x: f64) -> String {
    // Axis ticks fall on whole numbers of nines: 0 -> 0%, 1 -> 90%, 2 -> 99%, ...
    let pct = 100.0 * (1.0 - 10f64.powf(-x));
    if x < 0.5 {
        "0%".to_owned()
    } else if x < 1.5 {
        "90%".to_owned()
    } else {
        let decimals = (x.round() as usize).saturating_sub(2);
        format!("{pct:.decimals$}%")
    }
}

/// Draws the report as an SVG document.
///
/// # Errors
///
/// [`Error::Render`] when plotters fails to lay the charts out.
pub fn render(report: &Report) -> Result<String, Error> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(render_error)?;
        let (title, body) = root.split_vertically(50);
        let (top, bottom) = body.split_vertically((HEIGHT - 50) / 2);
        draw_title(&title, report)?;
        draw_curve(&top, report)?;
        draw_timeline(&bottom, report)?;
        root.present().map_err(render_error)?;
    }
    Ok(svg)
}

fn draw_title<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let p = &report.parameters;
    let m = &report.measured;
    let model = match p.rate_rps {
        Some(rate) => format!("open loop {} req/s", format::rate(rate)),
        None => "closed loop".to_owned(),
    };
    let headline = format!(
        "loadtest {} · {model} · {} connections · {} measured",
        p.scenario.as_str(),
        p.connections,
        format::seconds(p.duration_s)
    );
    let figures = format!(
        "{} req/s answered · p50 {} · p99 {} · p99.9 {} · max {} · errors {} · {}",
        format::rate(m.throughput_rps),
        format::latency(m.latency.p50_ms),
        format::latency(m.latency.p99_ms),
        format::latency(m.latency.p99_9_ms),
        format::latency(m.latency.max_ms),
        format::percent(m.error_rate),
        p.url,
    );
    area.draw_text(
        &headline,
        &("sans-serif", 20).into_font().color(&BLACK),
        (12, 6),
    )
    .map_err(render_error)?;
    area.draw_text(
        &figures,
        &("sans-serif", 14).into_font().color(&BLACK.mix(0.7)),
        (12, 30),
    )
    .map_err(render_error)?;
    Ok(())
}

fn draw_curve<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let points: Vec<(f64, f64)> = report
        .measured
        .latency_curve
        .iter()
        .map(|p| (nines(p.percentile), p.latency_ms))
        .collect();
    let service: Vec<(f64, f64)> = report
        .open_loop
        .as_ref()
        .map(|open| {
            open.service_curve
                .iter()
                .map(|p| (nines(p.percentile), p.latency_ms))
                .collect()
        })
        .unwrap_or_default();
    let y_max = points
        .iter()
        .chain(&service)
        .map(|p| p.1)
        .fold(0.0, f64::max)
        .max(0.001)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Latency by percentile", ("sans-serif", 16))
        .margin(12)
        // Room for the last axis label, 99.999%, centred on the right edge.
        .margin_right(36)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..MAX_NINES, 0.0..y_max)
        .map_err(render_error)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .x_label_formatter(&|x| nines_label(*x))
        .y_label_formatter(&|y| format::latency(*y))
        .x_desc("percentile")
        .y_desc("latency")
        .draw()
        .map_err(render_error)?;
    if points.is_empty() {
        chart
            .draw_series(std::iter::once(Text::new(
                "no answers",
                (2.0, y_max / 2.0),
                ("sans-serif", 18),
            )))
            .map_err(render_error)?;
        return Ok(());
    }
    let label = if report.open_loop.is_some() {
        "latency from scheduled send"
    } else {
        "latency"
    };
    chart
        .draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(render_error)?
        .label(label)
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if !service.is_empty() {
        let orange = RGBColor(230, 120, 20);
        chart
            .draw_series(LineSeries::new(service, orange.stroke_width(2)))
            .map_err(render_error)?
            .label("service time, from actual send (hides queueing)")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], orange.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(render_error)?;
    Ok(())
}

fn draw_timeline<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    report: &Report,
) -> Result<(), Error>
where
    DB::ErrorType: 'static,
{
    let timeline = &report.timeline;
    let t_max = timeline
        .last()
        .map_or(1.0, |p| p.t_s)
        .max(report.parameters.duration_s + report.parameters.warmup_s);
    let rps_max = timeline.iter().map(|p| p.rps).fold(0.0, f64::max).max(1.0) * 1.1;
    let p99_max = timeline
        .iter()
        .map(|p| p.p99_ms)
        .fold(0.0, f64::max)
        .max(0.001)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput and p99 over time", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(64)
        .right_y_label_area_size(64)
        .build_cartesian_2d(0.0..t_max, 0.0..rps_max)
        .map_err(render_error)?
        .set_secondary_coord(0.0..t_max, 0.0..p99_max);
    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc("requests per second")
        // Whole requests per second read better on an axis than tenths.
        .y_label_formatter(&|y| format::count(y.max(0.0).round() as u64))
        .draw()
        .map_err(render_error)?;
    chart
        .configure_secondary_axes()
        .y_desc("p99 latency")
        .y_label_formatter(&|y| format::latency(*y))
        .draw()
        .map_err(render_error)?;
    let warmup = report.parameters.warmup_s;
    if warmup > 0.0 {
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (warmup, rps_max)],
                BLACK.mix(0.06).filled(),
            )))
            .map_err(render_error)?
            .label("warm-up (excluded)")
            .legend(|(x, y)| {
                Rectangle::new([(x, y - 5), (x + 20, y + 5)], BLACK.mix(0.15).filled())
            });
    }
    let series = |f: fn(&crate::report::TimelinePoint) -> f64| -> Vec<(f64, f64)> {
        timeline.iter().map(|p| (p.t_s, f(p))).collect()
    };
    chart
        .draw_series(LineSeries::new(series(|p| p.rps), BLUE.stroke_width(2)))
        .map_err(render_error)?
        .label("req/s")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    if timeline.iter().any(|p| p.errors_per_s > 0.0) {
        chart
            .draw_series(LineSeries::new(
                series(|p| p.errors_per_s),
                RED.stroke_width(2),
            ))
            .map_err(render_error)?
            .label("errors/s")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    let p99: Vec<(f64, f64)> = timeline
        .iter()
        .filter(|p| p.phase != TimelinePhase::Drain || p.p99_ms > 0.0)
        .map(|p| (p.t_s, p.p99_ms))
        .collect();
    chart
        .draw_secondary_series(LineSeries::new(p99, DARK_GREEN.stroke_width(2)))
        .map_err(render_error)?
        .label("p99 (right axis)")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], DARK_GREEN.stroke_width(2)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(render_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{TimelinePoint, tests::sample_report};

    #[test]
    fn the_svg_is_self_contained_and_has_both_charts() {
        let mut report = sample_report(1000, Some(100.0));
        report.timeline = (1..=20)
            .map(|i| TimelinePoint {
                t_s: f64::from(i),
                rps: 100.0 + f64::from(i),
                errors_per_s: if i == 10 { 3.0 } else { 0.0 },
                p50_ms: 5.0,
                p99_ms: 20.0 + f64::from(i),
                phase: if i <= 5 {
                    TimelinePhase::Warmup
                } else {
                    TimelinePhase::Measured
                },
            })
            .collect();
        let svg = render(&report).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..100]);
        assert!(svg.trim_end().ends_with("</svg>"));
        for needle in [
            "Latency by percentile",
            "Throughput and p99 over time",
            "99.9%",
            "warm-up (excluded)",
            "errors/s",
            "service time",
        ] {
            assert!(svg.contains(needle), "missing {needle}");
        }
        assert!(
            svg.matches("<polyline").count() >= 4,
            "curves drawn as polylines"
        );
        // Nothing refers outside the file: no links, images, scripts, styles or fonts to fetch.
        for external in ["href", "<image", "<script", "@import", "url(", "@font-face"] {
            assert!(!svg.contains(external), "{external} in the SVG");
        }
    }

    #[test]
    fn empty_runs_still_render() {
        let mut report = sample_report(0, None);
        report.measured.latency_curve.clear();
        report.timeline.clear();
        let svg = render(&report).unwrap();
        assert!(svg.contains("no answers"));
    }

    #[test]
    fn percentile_axis_labels() {
        assert_eq!(nines(0.0), 0.0);
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(nines(100.0), MAX_NINES);
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(5.0), "99.999%");
    }
}
