//! PNG line and scatter plots for training curves and parameter sweeps.
//!
//! A figure is a grid of [`Panel`]s, each with its own axes (linear or logarithmic) and
//! series. Text is drawn with a TrueType font found on the system (DejaVu Sans, or the file
//! named by the `CLARKE_PLOT_FONT` environment variable); without one the curves are still
//! drawn and the labels are left out, with a warning on stderr.
//!
//! ```no_run
//! use clarke_nn::plot::{save_png, Panel};
//!
//! let loss: Vec<(f64, f64)> = (0..10).map(|e| (e as f64, 1.0 / (1.0 + e as f64))).collect();
//! let panel = Panel::new("training loss").labels("epoch", "loss").log_y().line("train", loss);
//! save_png("loss.png", &[panel]).unwrap();
//! ```

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;

/// How a series is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Points joined by straight segments.
    Line,
    /// Points only.
    Points,
    /// Points joined by segments, with each point marked.
    LinePoints,
}

/// One named series of `(x, y)` points.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend entry.
    pub name: String,
    /// The points, in drawing order. Non-finite points (and non-positive ones on a log axis)
    /// are skipped. Data too spread for an axis (a linear range wider than `f64::MAX`, a log
    /// range whose ends differ by a factor beyond it) make [`save_png`] refuse the figure.
    pub points: Vec<(f64, f64)>,
    /// How to draw it.
    pub mark: Mark,
}

/// The `(start, end)` of a panel's x and y axes.
type AxisRanges = ((f64, f64), (f64, f64));

/// One set of axes with its series.
#[derive(Debug, Clone, Default)]
pub struct Panel {
    /// Title above the axes.
    pub title: String,
    /// Label of the x axis.
    pub x_label: String,
    /// Label of the y axis.
    pub y_label: String,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// The series, drawn in order with the palette's colours.
    pub series: Vec<Series>,
}

impl Panel {
    /// An empty panel with a title.
    pub fn new(title: impl Into<String>) -> Self {
        Panel {
            title: title.into(),
            ..Panel::default()
        }
    }

    /// Sets the axis labels.
    pub fn labels(mut self, x: impl Into<String>, y: impl Into<String>) -> Self {
        self.x_label = x.into();
        self.y_label = y.into();
        self
    }

    /// Makes the x axis logarithmic.
    pub fn log_x(mut self) -> Self {
        self.log_x = true;
        self
    }

    /// Makes the y axis logarithmic.
    pub fn log_y(mut self) -> Self {
        self.log_y = true;
        self
    }

    /// Adds a series drawn as a line.
    pub fn line(self, name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        self.series(name, points, Mark::Line)
    }

    /// Adds a series drawn as points.
    pub fn points(self, name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        self.series(name, points, Mark::Points)
    }

    /// Adds a series drawn as a line with marked points.
    pub fn line_points(self, name: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        self.series(name, points, Mark::LinePoints)
    }

    /// Adds a series with an explicit mark.
    pub fn series(mut self, name: impl Into<String>, points: Vec<(f64, f64)>, mark: Mark) -> Self {
        self.series.push(Series {
            name: name.into(),
            points,
            mark,
        });
        self
    }

    /// Whether a point can be drawn on this panel's axes (finite, positive on a log axis).
    fn is_drawable(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.log_x || x > 0.0) && (!self.log_y || y > 0.0)
    }

    /// The points of a series that can be drawn on this panel's axes.
    fn drawable(&self, s: &Series) -> Vec<(f64, f64)> {
        s.points.iter().copied().filter(|&p| self.is_drawable(p)).collect()
    }

    /// The data range on each axis, padded (and widened when it is a single value), or why
    /// an axis cannot be drawn: its padded range must have a finite width (a finite ratio of
    /// its ends on a log axis), else the backend's tick search does not terminate.
    fn ranges(&self) -> Result<AxisRanges, String> {
        let pts: Vec<(f64, f64)> = self.series.iter().flat_map(|s| self.drawable(s)).collect();
        let axis = |name: char, vals: Vec<f64>, log: bool| {
            let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if !lo.is_finite() {
                return Ok(if log { (0.1, 10.0) } else { (0.0, 1.0) });
            }
            let (start, end) = if log {
                let (lo, hi) = if hi / lo < 1.01 { (lo / 2.0, hi * 2.0) } else { (lo, hi) };
                (lo / 1.1, hi * 1.1)
            } else {
                let pad = if hi - lo > 0.0 {
                    0.05 * (hi - lo)
                } else {
                    lo.abs().max(1.0) * 0.5
                };
                (lo - pad, hi + pad)
            };
            let drawable = if log {
                start > 0.0 && (end / start).is_finite()
            } else {
                (end - start).is_finite()
            };
            if drawable {
                Ok((start, end))
            } else {
                Err(format!(
                    "panel {:?}: the {name} data [{lo:e}, {hi:e}] are too large or too spread for a {} axis (its padded range overflows)",
                    self.title,
                    if log { "log" } else { "linear" }
                ))
            }
        };
        Ok((
            axis('x', pts.iter().map(|p| p.0).collect(), self.log_x)?,
            axis('y', pts.iter().map(|p| p.1).collect(), self.log_y)?,
        ))
    }
}

/// Registers the system font once; `true` when text can be drawn.
fn font_available() -> bool {
    static FONT: OnceLock<bool> = OnceLock::new();
    *FONT.get_or_init(|| {
        let mut candidates: Vec<std::path::PathBuf> = Vec::new();
        if let Some(p) = std::env::var_os("CLARKE_PLOT_FONT") {
            candidates.push(p.into());
        }
        for p in [
            "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
            "/usr/share/fonts/TTF/DejaVuSans.ttf",
            "/usr/share/fonts/dejavu/DejaVuSans.ttf",
            "/Library/Fonts/Arial.ttf",
            "C:\\Windows\\Fonts\\arial.ttf",
        ] {
            candidates.push(p.into());
        }
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps fonts for the life of the program.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        eprintln!("plot: no TrueType font found (set CLARKE_PLOT_FONT); drawing without labels");
        false
    })
}

/// Saves the panels as one PNG: up to three panels per row, 560 x 420 pixels each.
///
/// # Errors
/// `InvalidInput` when there are no panels, the path does not end in `.png` (the encoder
/// picks the format from the extension: `.jpg` would silently write a JPEG), a panel's data
/// are too spread for its axes (naming the panel and axis; see [`Series::points`]), or the
/// figure is too tall for a bitmap; otherwise when the file cannot be written.
pub fn save_png(path: impl AsRef<Path>, panels: &[Panel]) -> std::io::Result<()> {
    let invalid = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("plot: {msg}"));
    if panels.is_empty() {
        return Err(invalid("no panels to draw".into()));
    }
    let is_png = path.as_ref().extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        return Err(invalid(format!(
            "{}: the file name must end in .png",
            path.as_ref().display()
        )));
    }
    let ranges = panels
        .iter()
        .map(Panel::ranges)
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    let cols = panels.len().min(3);
    let rows = panels.len().div_ceil(cols);
    let height = u32::try_from(rows)
        .ok()
        .and_then(|r| r.checked_mul(420))
        .ok_or_else(|| invalid(format!("{} panels make a figure too tall for a bitmap", panels.len())))?;
    let size = (560 * cols as u32, height);
    let text = font_available();
    let root = BitMapBackend::new(path.as_ref(), size).into_drawing_area();
    let io = |e: &dyn std::fmt::Display| std::io::Error::other(format!("plot: {e}"));
    root.fill(&WHITE).map_err(|e| io(&e))?;
    let areas = root.split_evenly((rows, cols));
    for ((panel, area), ranges) in panels.iter().zip(areas.iter()).zip(ranges) {
        draw_panel(panel, area, ranges, text).map_err(|e| io(&e))?;
    }
    root.present().map_err(|e| io(&e))?;
    Ok(())
}

type DrawResult = Result<(), DrawingAreaErrorKind<<BitMapBackend<'static> as DrawingBackend>::ErrorType>>;

/// Draws `panel` on `area` with the axis ranges from [`Panel::ranges`].
fn draw_panel(
    panel: &Panel,
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    ((x0, x1), (y0, y1)): AxisRanges,
    text: bool,
) -> DrawResult {
    let mut builder = ChartBuilder::on(area);
    builder.margin(12);
    if text {
        builder
            .caption(&panel.title, ("sans-serif", 20))
            .x_label_area_size(40)
            .y_label_area_size(64);
    } else {
        builder.x_label_area_size(8).y_label_area_size(8);
    }
    // One arm per axis kind: plotters' coordinate types differ.
    macro_rules! finish {
        ($chart:expr) => {{
            let mut chart = $chart;
            let mut mesh = chart.configure_mesh();
            if text {
                mesh.x_desc(panel.x_label.as_str())
                    .y_desc(panel.y_label.as_str())
                    .x_label_formatter(&|v| tick_label(*v))
                    .y_label_formatter(&|v| tick_label(*v));
            } else {
                mesh.disable_x_axis().disable_y_axis();
            }
            mesh.draw()?;
            for (i, s) in panel.series.iter().enumerate() {
                let colour = Palette99::pick(i).to_rgba();
                let pts = panel.drawable(s);
                let legend_colour = colour;
                if matches!(s.mark, Mark::Line | Mark::LinePoints) {
                    let ann = chart.draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))?;
                    if text {
                        ann.label(s.name.as_str()).legend(move |(x, y)| {
                            PathElement::new(vec![(x, y), (x + 18, y)], legend_colour.stroke_width(2))
                        });
                    }
                }
                if matches!(s.mark, Mark::Points | Mark::LinePoints) {
                    let ann = chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, colour.filled())))?;
                    if text && s.mark == Mark::Points {
                        ann.label(s.name.as_str())
                            .legend(move |(x, y)| Circle::new((x + 9, y), 3, legend_colour.filled()));
                    }
                }
            }
            if text && panel.series.iter().any(|s| !s.name.is_empty()) {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.85))
                    .border_style(BLACK)
                    .label_font(("sans-serif", 14))
                    .draw()?;
            }
            Ok(())
        }};
    }
    match (panel.log_x, panel.log_y) {
        (false, false) => finish!(builder.build_cartesian_2d(x0..x1, y0..y1)?),
        (true, false) => finish!(builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1)?),
        (false, true) => finish!(builder.build_cartesian_2d(x0..x1, (y0..y1).log_scale())?),
        (true, true) => finish!(builder.build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?),
    }
}

/// A compact tick label: `0.25`, `1200`, `1e-5` (not `9.999999999999998e-6`).
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}").replace(".0e", "e");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(tick_label(9.999999999999998e-6), "1e-5");
        assert_eq!(tick_label(1.0000000000000001e-7), "1e-7");
        assert_eq!(tick_label(0.25), "0.25");
        assert_eq!(tick_label(1200.0), "1200");
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(-2.5e6), "-2.5e6");
    }

    #[test]
    fn writes_a_png_with_linear_and_log_panels() {
        let dir = std::env::temp_dir().join(format!("clarke-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("curves.png");
        let pts: Vec<(f64, f64)> = (1..20).map(|i| (i as f64, 1.0 / i as f64)).collect();
        let panels = [
            Panel::new("linear").labels("x", "y").line("a", pts.clone()),
            Panel::new("log")
                .log_x()
                .log_y()
                .line_points("b", pts.clone())
                .points("c", vec![(2.0, f64::NAN)]),
        ];
        save_png(&path, &panels).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_an_empty_figure() {
        let err = save_png(std::env::temp_dir().join("never.png"), &[]).unwrap_err();
        assert!(err.to_string().contains("no panels"));
    }
}
