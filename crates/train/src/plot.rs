//! Hand-written SVG line charts: loss curves per step and recall per epoch, written next to
//! the checkpoints at the end of a run. No plotting dependency, readable in any browser.

use std::fmt::Write;

/// One named line of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLOURS: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// A line chart with axes, ticks, a title and a legend. Non-finite points are skipped.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, series: &[Series]) -> String {
    let (w, h) = (720.0, 420.0);
    let (left, right, top, bottom) = (70.0, 170.0, 40.0, 50.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let pts = || series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts() {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-12 {
        y1 = y0 + 1.0;
    }
    // A little headroom; recall-like axes start at 0.
    let pad = 0.05 * (y1 - y0);
    let (y0, y1) = (if y0 >= 0.0 && y0 - pad < 0.0 { 0.0 } else { y0 - pad }, y1 + pad);
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| top + ph - (y - y0) / (y1 - y0) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, left + pw / 2.0, esc(title));
    for i in 0..=5 {
        let fy = y0 + (y1 - y0) * i as f64 / 5.0;
        let fx = x0 + (x1 - x0) * i as f64 / 5.0;
        let _ = writeln!(s, r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#e5e5e5"/>"##, sy(fy), left + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{}</text>"#, left - 6.0, sy(fy) + 4.0, tick(fy));
        let _ = writeln!(s, r#"<text x="{:.1}" y="{}" text-anchor="middle">{}</text>"#, sx(fx), top + ph + 18.0, tick(fx));
    }
    let _ = writeln!(s, r#"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#, left + pw / 2.0, h - 10.0, esc(x_label));
    let _ = writeln!(s, r#"<text transform="translate(18 {}) rotate(-90)" text-anchor="middle">{}</text>"#, top + ph / 2.0, esc(y_label));
    for (i, ser) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let p: Vec<String> =
            ser.points.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        if p.len() == 1 {
            let _ = writeln!(
                s,
                r#"<circle cx="{}" cy="{}" r="3" fill="{c}"/>"#,
                p[0].split(',').next().unwrap(),
                p[0].split(',').nth(1).unwrap()
            );
        } else if !p.is_empty() {
            let _ = writeln!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1.8" points="{}"/>"#, p.join(" "));
        }
        let ly = top + 10.0 + 18.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{0}" y1="{ly}" x2="{1}" y2="{ly}" stroke="{c}" stroke-width="3"/>"#,
            left + pw + 12.0,
            left + pw + 32.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{}</text>"#, left + pw + 38.0, ly + 4.0, esc(&ser.name));
    }
    s.push_str("</svg>\n");
    s
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_maps_points_inside_the_plot_area() {
        let svg = line_chart(
            "loss <total>",
            "step",
            "loss",
            &[
                Series { name: "total".into(), points: vec![(0.0, 4.0), (10.0, 2.0), (20.0, f64::NAN), (30.0, 1.0)] },
                Series { name: "one".into(), points: vec![(5.0, 3.0)] },
            ],
        );
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("loss &lt;total&gt;"));
        // First point at the left edge, last at the right edge; NaN skipped.
        let poly = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
        let pts: Vec<&str> = poly.split("points=\"").nth(1).unwrap().trim_end_matches("\"/>").split(' ').collect();
        assert_eq!(pts.len(), 3);
        assert!(pts[0].starts_with("70.0,"), "{poly}");
        assert!(pts[2].starts_with("550.0,"), "{poly}");
        assert!(svg.contains("<circle"));
    }
}
