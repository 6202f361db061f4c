//! The HTML run report: one self-contained file (inline CSS, SVG and PNG data URIs) with the
//! run's summary, the score histogram and its threshold, counts per group, and the most
//! anomalous images beside their per-pixel heat maps and the normal images they resemble most.

use std::fmt::Write;

use base64::Engine;

use crate::data::ImageShape;
use crate::error::Result;
use crate::io::png;

/// One flagged image to draw.
#[derive(Debug, Clone)]
pub struct Flagged {
    /// Its id.
    pub id: String,
    /// Its score.
    pub score: f64,
    /// −log p per sub-pixel (row-major, channels last).
    pub pixel_nll: Vec<f32>,
    /// Its shape.
    pub shape: ImageShape,
    /// The image's own pixels (8-bit), when the source could be read back.
    pub pixels: Option<Vec<u8>>,
    /// The normal (training) images it most resembles, nearest first: id and 8-bit pixels of
    /// the same shape.
    pub nearest: Vec<(String, Vec<u8>)>,
}

/// Counts of one group (a partition, or the whole run).
#[derive(Debug, Clone)]
pub struct GroupCount {
    /// The group's name.
    pub name: String,
    /// Images scored.
    pub images: u64,
    /// Images flagged.
    pub flagged: u64,
}

/// One group of the run's anomalies, with its most anomalous examples.
#[derive(Debug, Clone)]
pub struct AnomalyGroupView {
    /// Its `group` value (0 the largest).
    pub group: i32,
    /// Flagged images in it.
    pub images: u64,
    /// A few of them, most anomalous first.
    pub examples: Vec<Flagged>,
}

/// One committed run, from the `history/` table.
#[derive(Debug, Clone, Default)]
pub struct Night {
    /// The run.
    pub run_id: String,
    /// When it was committed (RFC 3339, UTC).
    pub finished_at: String,
    /// Images scored and flagged.
    pub scored: i64,
    /// Images flagged.
    pub flagged: i64,
    /// Score quantiles 50/90/99/99.9%, where the run had scores.
    pub quantiles: Option<[f64; 4]>,
    /// Share of p-values below 0.01.
    pub p_below_001: Option<f64>,
    /// The drift test: statistic, p-value, verdict.
    pub drift: Option<(f64, f64, bool)>,
}

/// What the report shows.
#[derive(Debug, Clone)]
pub struct Report {
    /// Title line: pipeline and run.
    pub title: String,
    /// Key–value facts (model, threshold, rows, …) in display order.
    pub facts: Vec<(String, String)>,
    /// Every score of the run.
    pub scores: Vec<f64>,
    /// The threshold (may be infinite).
    pub threshold: f64,
    /// Counts per group.
    pub groups: Vec<GroupCount>,
    /// The top anomalies, most anomalous first.
    pub flagged: Vec<Flagged>,
    /// The groups of anomalies, largest first (empty for a model without an embedding).
    pub anomaly_groups: Vec<AnomalyGroupView>,
    /// The sink's last runs, oldest first (empty for a sink without a `history/` table).
    pub nights: Vec<Night>,
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Renders the report as one HTML document.
pub fn render(r: &Report) -> Result<String> {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title>\n<style>{CSS}</style></head><body>\n<h1>{}</h1>\n<table class=\"facts\">",
        escape(&r.title),
        escape(&r.title)
    );
    for (k, v) in &r.facts {
        let _ = write!(
            html,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape(k),
            escape(v)
        );
    }
    html.push_str("</table>\n<h2>Scores</h2>\n");
    html.push_str(&histogram_svg(&r.scores, r.threshold));
    html.push_str("\n<h2>Per group</h2>\n<table class=\"groups\"><tr><th>group</th><th>images</th><th>flagged</th><th>share</th></tr>");
    for g in &r.groups {
        let share = if g.images > 0 {
            100.0 * g.flagged as f64 / g.images as f64
        } else {
            0.0
        };
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{share:.2}%</td></tr>",
            escape(&g.name),
            g.images,
            g.flagged
        );
    }
    html.push_str("</table>\n");
    html.push_str(&nights_table(&r.nights));
    let _ = write!(
        html,
        "<h2>Top {} anomalies</h2>\n<div class=\"cards\">",
        r.flagged.len()
    );
    for f in &r.flagged {
        html.push_str(&card(f)?);
    }
    html.push_str("</div>\n");
    if !r.anomaly_groups.is_empty() {
        html.push_str("<h2>Groups of anomalies</h2>\n");
    }
    for g in &r.anomaly_groups {
        let _ = write!(
            html,
            "<div class=\"group\"><h3>group {} — {} image{}</h3><div class=\"cards\">",
            g.group,
            g.images,
            if g.images == 1 { "" } else { "s" }
        );
        for f in &g.examples {
            html.push_str(&card(f)?);
        }
        html.push_str("</div></div>\n");
    }
    html.push_str("</body></html>\n");
    Ok(html)
}

/// The last runs: their score distribution (quantiles), the share of small p-values, and the
/// drift test of each against the model's calibration scores; drifted runs stand out.
fn nights_table(nights: &[Night]) -> String {
    if nights.is_empty() {
        return String::new();
    }
    let mut html = String::from(
        "<h2>Runs and drift</h2>\n<p>Score quantiles of the last runs, and the drift test of each run's scores against the model's calibration scores (Kolmogorov–Smirnov, level 0.01). A run that drifted no longer looks like the data the model was fitted on: refit it on recent normal images.</p>\n<table class=\"nights\"><tr><th>run</th><th>finished</th><th>scored</th><th>flagged</th><th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>p &lt; 0.01</th><th>drift statistic</th><th>drift p-value</th><th></th></tr>",
    );
    let num =
        |v: Option<f64>, digits: usize| v.map_or("—".to_string(), |v| format!("{v:.digits$}"));
    for n in nights {
        let q = |k: usize| num(n.quantiles.map(|q| q[k]), 2);
        let (stat, p, drifted) = match n.drift {
            Some((s, p, d)) => (format!("{s:.3}"), format!("{p:.2e}"), d),
            None => ("—".into(), "—".into(), false),
        };
        let _ = write!(
            html,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{stat}</td><td>{p}</td><td>{}</td></tr>",
            if drifted { " class=\"drifted\"" } else { "" },
            escape(&n.run_id),
            escape(&n.finished_at),
            n.scored,
            n.flagged,
            q(0),
            q(1),
            q(2),
            q(3),
            n.p_below_001
                .map_or("—".to_string(), |v| format!("{:.2}%", 100.0 * v)),
            if drifted { "drifted" } else { "" },
        );
    }
    html.push_str("</table>\n");
    html
}

/// One flagged image's card: the image, its heat map, its nearest normal images, its id and
/// score.
fn card(f: &Flagged) -> Result<String> {
    let heat = data_uri(&heat_map_png(&f.pixel_nll, f.shape)?);
    let image = match &f.pixels {
        Some(p) => format!(
            "<img class=\"image\" alt=\"image {id}\" src=\"{}\">",
            image_uri(p, f.shape)?,
            id = escape(&f.id)
        ),
        None => "<div class=\"missing\">image not readable here</div>".to_string(),
    };
    let mut nearest = String::new();
    for (id, pixels) in &f.nearest {
        let _ = write!(
            nearest,
            "<img class=\"nearest\" alt=\"nearest normal {id}\" title=\"nearest normal {id}\" src=\"{}\">",
            image_uri(pixels, f.shape)?,
            id = escape(id)
        );
    }
    if !nearest.is_empty() {
        nearest = format!("<div class=\"neighbours\">nearest normal<br>{nearest}</div>");
    }
    Ok(format!(
        "<figure class=\"card\">{image}<img class=\"heat\" alt=\"heat map {id}\" src=\"{heat}\">{nearest}<figcaption>{id}<br>score {:.2}</figcaption></figure>",
        f.score,
        id = escape(&f.id)
    ))
}

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:2em;color:#222}\
table{border-collapse:collapse;margin-bottom:1em}th,td{padding:.25em .75em;text-align:left;border-bottom:1px solid #ddd}\
.cards{display:flex;flex-wrap:wrap;gap:1em}.card{margin:0;text-align:center;font-size:.85em}\
.card img{width:112px;height:112px;image-rendering:pixelated;border:1px solid #ccc;margin:2px}\
.missing{display:inline-block;width:112px;height:112px;background:#eee;font-size:.75em}\
.neighbours{font-size:.8em;color:#555}.card img.nearest{width:56px;height:56px}\
svg text{font-size:11px}tr.drifted td{background:#fde2e1}";

/// An 8-bit image of `shape` as a PNG data URI.
fn image_uri(pixels: &[u8], shape: ImageShape) -> Result<String> {
    Ok(data_uri(&png::encode(
        pixels.to_vec(),
        shape.width as u32,
        shape.height as u32,
        shape.channels,
    )?))
}

fn data_uri(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// The per-pixel NLL (summed over channels) as an RGB heat map: black (likely) through red to
/// yellow (the image's least likely pixel).
pub fn heat_map_png(pixel_nll: &[f32], shape: ImageShape) -> Result<Vec<u8>> {
    let per_pixel: Vec<f32> = pixel_nll
        .chunks(shape.channels.max(1))
        .map(|c| c.iter().sum())
        .collect();
    let max = per_pixel.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
    let mut rgb = Vec::with_capacity(per_pixel.len() * 3);
    for v in per_pixel {
        let t = (v.max(0.0) / max).clamp(0.0, 1.0);
        rgb.push((255.0 * (2.0 * t).min(1.0)) as u8);
        rgb.push((255.0 * (2.0 * t - 1.0).max(0.0)) as u8);
        rgb.push(0);
    }
    png::encode(rgb, shape.width as u32, shape.height as u32, 3)
}

/// A 40-bin histogram of the finite scores as inline SVG, with the threshold as a red line.
pub fn histogram_svg(scores: &[f64], threshold: f64) -> String {
    const BINS: usize = 40;
    const W: f64 = 720.0;
    const H: f64 = 220.0;
    const PAD: f64 = 30.0;
    let finite: Vec<f64> = scores.iter().copied().filter(|s| s.is_finite()).collect();
    if finite.is_empty() {
        return "<p>No scores.</p>".into();
    }
    let mut sorted = finite.clone();
    sorted.sort_by(f64::total_cmp);
    let mut lo = sorted[0];
    // A few extreme scores would squash the rest into one bar: the axis ends half as far again
    // past the 95th percentile (or the threshold), and the last bar collects everything beyond.
    let q = sorted[((sorted.len() as f64 * 0.95) as usize).min(sorted.len() - 1)];
    let edge = if threshold.is_finite() {
        q.max(threshold)
    } else {
        q
    };
    if threshold.is_finite() {
        lo = lo.min(threshold);
    }
    let hi = (edge + 0.5 * (edge - lo))
        .min(sorted[sorted.len() - 1])
        .max(lo + 1e-9);
    let beyond = sorted.iter().filter(|&&s| s > hi).count();
    let width = (hi - lo) / BINS as f64;
    let mut counts = [0u64; BINS];
    for s in &finite {
        counts[(((s - lo) / width).max(0.0) as usize).min(BINS - 1)] += 1;
    }
    let top = *counts.iter().max().expect("bins") as f64;
    let x = |v: f64| PAD + (v - lo) / (hi - lo).max(1e-9) * (W - 2.0 * PAD);
    let mut svg = format!(
        "<svg class=\"histogram\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" xmlns=\"http://www.w3.org/2000/svg\">"
    );
    let bar = (W - 2.0 * PAD) / BINS as f64;
    for (i, &c) in counts.iter().enumerate() {
        let h = (H - 2.0 * PAD) * c as f64 / top;
        let _ = write!(
            svg,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{h:.1}\" fill=\"#4a7ab5\"><title>{c}</title></rect>",
            PAD + i as f64 * bar,
            H - PAD - h,
            bar - 1.0
        );
    }
    if threshold.is_finite() {
        let tx = x(threshold);
        let _ = write!(
            svg,
            "<line class=\"threshold\" x1=\"{tx:.1}\" x2=\"{tx:.1}\" y1=\"{}\" y2=\"{}\" stroke=\"#d22\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{}\" fill=\"#d22\">threshold {threshold:.2}</text>",
            PAD / 2.0,
            H - PAD,
            tx + 4.0,
            PAD
        );
    }
    let tail = if beyond > 0 {
        format!(
            " (the last bar also holds {beyond} scores up to {:.1})",
            sorted[sorted.len() - 1]
        )
    } else {
        String::new()
    };
    let _ = write!(
        svg,
        "<text x=\"{PAD}\" y=\"{}\">{lo:.1}</text><text x=\"{}\" y=\"{}\" text-anchor=\"end\">{hi:.1} nats{tail}</text></svg>",
        H - 8.0,
        W - PAD,
        H - 8.0
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_counts_every_score_and_marks_the_threshold() {
        let scores: Vec<f64> = (0..1000).map(|i| f64::from(i % 97)).collect();
        let svg = histogram_svg(&scores, 90.0);
        let counted: u64 = svg
            .split("<title>")
            .skip(1)
            .map(|s| s.split('<').next().unwrap().parse::<u64>().unwrap())
            .sum();
        assert_eq!(counted, 1000);
        assert!(svg.contains("class=\"threshold\"") && svg.contains("threshold 90.00"));
        assert!(!histogram_svg(&scores, f64::INFINITY).contains("class=\"threshold\""));
    }

    #[test]
    fn the_heat_map_is_brightest_at_the_least_likely_pixel() {
        let shape = ImageShape::new(2, 2, 1);
        let png = heat_map_png(&[0.0, 1.0, 4.0, 2.0], shape).unwrap();
        let (s, px) = crate::io::decode::decode_png(&png).unwrap();
        assert_eq!((s.height, s.width, s.channels), (2, 2, 3));
        assert_eq!(&px[6..9], &[255, 255, 0]);
        assert_eq!(&px[0..3], &[0, 0, 0]);
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            escape("<a href=\"x\">&</a>"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }
}
