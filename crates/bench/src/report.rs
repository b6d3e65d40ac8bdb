//! Rows of the report: a measured figure, its latency percentiles, the server's RSS, and its
//! ratio to each ceiling measured in the same run (each ceiling also has its own row).

use hdrhistogram::Histogram;

#[derive(Clone, Debug)]
pub struct Ceiling {
    pub name: &'static str,
    pub rate: f64,
}

impl Ceiling {
    pub fn new(name: &'static str, rate: f64) -> Self {
        Self { name, rate }
    }
}

#[derive(Clone, Debug)]
pub struct Row {
    pub label: String,
    /// Messages per second.
    pub rate: f64,
    /// Microseconds.
    pub latency: Option<Histogram<u64>>,
    pub ceilings: Vec<Ceiling>,
    /// Server RSS at start and at its peak (MiB).
    pub rss: Option<(f64, f64)>,
    pub note: Option<String>,
}

impl Row {
    pub fn measured(label: &str, rate: f64, latency: Option<Histogram<u64>>, ceilings: Vec<Ceiling>) -> Self {
        Self {
            label: label.to_owned(),
            rate,
            latency,
            ceilings,
            rss: None,
            note: None,
        }
    }

    /// A ceiling's own row (no ratio).
    pub fn ceiling(label: &str, rate: f64, latency: Option<Histogram<u64>>) -> Self {
        Self::measured(label, rate, latency, Vec::new())
    }

    pub fn with_rss(mut self, idle: f64, peak: f64) -> Self {
        self.rss = Some((idle, peak));
        self
    }

    pub fn with_note(mut self, note: String) -> Self {
        self.note = Some(note);
        self
    }
}

pub fn header() -> String {
    format!(
        "{:<44} {:>10} {:>7} {:>7} {:>7} {:>7} {:>7}  {:>11}  {}",
        "scenario", "msg/s", "p50", "p90", "p99", "p99.9", "max", "RSS MiB", "ratio to each ceiling"
    )
}

fn ms(hist: &Histogram<u64>, quantile: f64) -> String {
    format!("{:.2}", hist.value_at_quantile(quantile) as f64 / 1000.0)
}

pub fn render(row: &Row) -> String {
    let (p50, p90, p99, p999, max) = match &row.latency {
        Some(h) if !h.is_empty() => (
            ms(h, 0.5),
            ms(h, 0.9),
            ms(h, 0.99),
            ms(h, 0.999),
            format!("{:.2}", h.max() as f64 / 1000.0),
        ),
        _ => Default::default(),
    };
    let rss = row
        .rss
        .map(|(idle, peak)| format!("{idle:.0}/{peak:.0}"))
        .unwrap_or_default();
    let ratio = row
        .ceilings
        .iter()
        .map(|c| format!("{:.2}x {}", row.rate / c.rate, c.name))
        .collect::<Vec<_>>()
        .join(" · ");
    let note = row.note.as_deref().map(|n| format!("  ({n})")).unwrap_or_default();
    format!(
        "{:<44} {:>10.0} {p50:>7} {p90:>7} {p99:>7} {p999:>7} {max:>7}  {rss:>11}  {ratio}{note}",
        row.label, row.rate
    )
}

/// Per row position, the round with the median rate; a measured row's ceilings become the
/// medians of each ceiling over the rounds.
pub fn median_rows(rounds: Vec<Vec<Row>>) -> Vec<Row> {
    let Some(first) = rounds.first() else { return Vec::new() };
    let positions = first.len();
    (0..positions)
        .filter_map(|i| {
            let mut candidates: Vec<&Row> = rounds.iter().filter_map(|r| r.get(i)).collect();
            candidates.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let mut row = (*candidates.get(candidates.len() / 2)?).clone();
            for ceiling in &mut row.ceilings {
                let mut rates: Vec<f64> = candidates
                    .iter()
                    .filter_map(|r| r.ceilings.iter().find(|c| c.name == ceiling.name))
                    .map(|c| c.rate)
                    .collect();
                rates.sort_by(f64::total_cmp);
                if let Some(m) = rates.get(rates.len() / 2) {
                    ceiling.rate = *m;
                }
            }
            Some(row)
        })
        .collect()
}
