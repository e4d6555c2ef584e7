//! The report of a chaos run: Markdown for people, JSON for machines, and an SVG timeline
//! per scenario (requests answered per second, failures, and the fault windows).

use std::fmt::Write as _;
use std::path::Path;

use crate::scenario::Outcome;

/// Writes `report.md`, `report.json` and `<scenario>-<seed>.svg` under `out`.
pub fn write(out: &Path, outcomes: &[Outcome]) -> std::io::Result<()> {
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("report.json"), serde_json::to_string_pretty(outcomes).unwrap_or_default())?;
    let mut md = String::from(
        "# arca chaos report\n\n| scenario | seed | result | ops (acked / unanswered) | RTO | RPO | max standby lag |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for o in outcomes {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} ({} / {}) | {} | {} | {} ms |",
            o.scenario,
            o.seed,
            if o.pass { "PASS" } else { "**FAIL**" },
            o.ops,
            o.acked,
            o.unanswered,
            o.rto_ms.map_or("—".into(), |r| format!("{r} ms")),
            o.rpo_writes.map_or("—".into(), |r| format!("{r} write(s), all in the divergence report")),
            o.lag_ms_max,
        );
    }
    for o in outcomes {
        let svg = format!("{}-{}.svg", o.scenario, o.seed);
        std::fs::write(out.join(&svg), timeline_svg(o))?;
        let _ = writeln!(
            md,
            "\n## {} (seed {}) — {}\n",
            o.scenario,
            o.seed,
            if o.pass { "PASS" } else { "FAIL" }
        );
        let _ = writeln!(md, "![timeline]({svg})\n");
        let _ = writeln!(md, "| invariant | result | evidence |\n| --- | --- | --- |");
        for v in &o.verdicts {
            let _ = writeln!(
                md,
                "| {} | {} | {} |",
                v.invariant,
                if v.pass { "pass" } else { "**FAIL**" },
                v.evidence.replace('|', "\\|").replace('\n', " ")
            );
        }
        let _ = writeln!(md, "\nTimeline:\n");
        for (at, kind, what) in &o.timeline {
            let _ = writeln!(md, "- `{:>7.3}s` {kind}: {what}", *at as f64 / 1000.0);
        }
        if !o.pass {
            let _ = writeln!(md, "\nReproduce: `{}` (process logs: `{}`)", o.reproduce, o.dir.display());
        }
    }
    std::fs::write(out.join("report.md"), md)
}

/// Requests per second (answered below 500 in green, others in red) with the fault windows
/// shaded and the events marked.
pub fn timeline_svg(o: &Outcome) -> String {
    let (w, h, left, top, plot_h) = (900.0, 260.0, 50.0, 30.0, 170.0);
    let secs = o.per_second.len().max(1) as f64;
    let max = o.per_second.iter().map(|(a, f)| a + f).max().unwrap_or(1).max(1) as f64;
    let x = |ms: f64| left + (ms / 1000.0) / secs * (w - left - 20.0);
    let bar_w = (w - left - 20.0) / secs;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"18\" font-size=\"13\">{} (seed {}) — {}</text>\n",
        o.scenario,
        o.seed,
        if o.pass { "PASS" } else { "FAIL" }
    );
    // Fault windows: from each fault to the next heal.
    let mut open: Option<u64> = None;
    for (at, kind, _) in &o.timeline {
        match kind.as_str() {
            "fault" if open.is_none() => open = Some(*at),
            "heal" => {
                if let Some(from) = open.take() {
                    let _ = writeln!(
                        svg,
                        "<rect x=\"{:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"#fde2e1\"/>",
                        x(from as f64),
                        (x(*at as f64) - x(from as f64)).max(1.0)
                    );
                }
            }
            _ => {}
        }
    }
    for (i, (ok, failed)) in o.per_second.iter().enumerate() {
        let bx = left + i as f64 * bar_w;
        let ok_h = *ok as f64 / max * plot_h;
        let fail_h = *failed as f64 / max * plot_h;
        let _ = writeln!(
            svg,
            "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{ok_h:.1}\" fill=\"#4caf50\"/>",
            top + plot_h - ok_h,
            bar_w * 0.8
        );
        let _ = writeln!(
            svg,
            "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{fail_h:.1}\" fill=\"#e53935\"/>",
            top + plot_h - ok_h - fail_h,
            bar_w * 0.8
        );
    }
    let end_ms = secs * 1000.0;
    let mut row = 0;
    for (at, kind, what) in &o.timeline {
        let marked = kind == "fault" || kind == "heal" || (kind == "info" && what.starts_with("RTO"));
        if !marked || *at as f64 > end_ms {
            continue;
        }
        let colour = if kind == "fault" { "#b71c1c" } else { "#1b5e20" };
        let ax = x(*at as f64);
        let _ = writeln!(
            svg,
            "<line x1=\"{ax:.1}\" y1=\"{top}\" x2=\"{ax:.1}\" y2=\"{}\" stroke=\"{colour}\" stroke-dasharray=\"3,2\"/>",
            top + plot_h
        );
        let label: String = what.chars().take(48).collect();
        let y = top + plot_h + 16.0 + 13.0 * (row % 3) as f64;
        row += 1;
        let _ = writeln!(
            svg,
            "<text x=\"{:.1}\" y=\"{y:.1}\" fill=\"{colour}\">{}</text>",
            ax + 2.0,
            escape(&label)
        );
    }
    let _ = writeln!(
        svg,
        "<line x1=\"{left}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>",
        top + plot_h,
        w - 20.0
    );
    let _ = writeln!(
        svg,
        "<text x=\"5\" y=\"{}\">{max:.0}/s</text><text x=\"5\" y=\"{}\">0</text>",
        top + 10.0,
        top + plot_h
    );
    let _ = writeln!(svg, "<text x=\"{}\" y=\"{}\">{secs:.0} s</text>", w - 45.0, top + plot_h + 14.0);
    let _ = writeln!(
        svg,
        "<text x=\"{left}\" y=\"{}\" fill=\"#555\">green: requests answered (&lt; 500) per second; red: failed or unanswered; shaded: fault windows</text>",
        h - 8.0
    );
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}
