//! What a training run tells the world: progress events while it runs, and a
//! machine-readable summary at the end. The types are the worker ↔ control-plane
//! contract and live in [`hetero_job::events`]; here are the loss curve's helpers.

pub use hetero_job::events::{
    ACCURACY_MARKS, Coverage, EpochRecord, Event, RunSummary, WorkerFigures, seconds_to_accuracy,
};

/// Most points kept in [`RunSummary::loss_curve`].
pub const LOSS_CURVE_POINTS: usize = 400;

/// Averages `losses` into at most `points` buckets of consecutive steps.
pub fn downsample(losses: &[f32], points: usize) -> Vec<f32> {
    if losses.len() <= points {
        return losses.to_vec();
    }
    (0..points)
        .map(|i| {
            let (a, b) = (losses.len() * i / points, losses.len() * (i + 1) / points);
            losses[a..b].iter().sum::<f32>() / (b - a) as f32
        })
        .collect()
}

/// The loss curve as a self-contained SVG picture.
pub fn loss_curve_svg(curve: &[f32], title: &str) -> String {
    let (w, h, pad) = (640.0f32, 320.0f32, 40.0f32);
    let max = curve.iter().cloned().fold(f32::MIN, f32::max).max(1e-6);
    let n = curve.len().max(2) - 1;
    let points: Vec<String> = curve
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let x = pad + (w - 2.0 * pad) * i as f32 / n as f32;
            let y = h - pad - (h - 2.0 * pad) * (l / max);
            format!("{x:.1},{y:.1}")
        })
        .collect();
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{pad}" y="20">{title}</text>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<text x="4" y="{top}">{max:.2}</text><text x="4" y="{b}">0</text>
<text x="{r}" y="{lbl}" text-anchor="end">training steps →</text>
<polyline fill="none" stroke="#1f6feb" stroke-width="1.5" points="{pts}"/>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        top = pad + 4.0,
        lbl = h - 12.0,
        pts = points.join(" ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downsample_keeps_means() {
        assert_eq!(downsample(&[1.0, 2.0], 5), vec![1.0, 2.0]);
        assert_eq!(downsample(&[1.0, 3.0, 5.0, 7.0], 2), vec![2.0, 6.0]);
    }

    #[test]
    fn svg_has_one_point_per_value() {
        let svg = loss_curve_svg(&[2.3, 1.0, 0.5], "loss");
        assert!(svg.starts_with("<svg"));
        let pts = svg.split("points=\"").nth(1).unwrap().split('"').next().unwrap();
        assert_eq!(pts.split(' ').count(), 3);
    }
}
