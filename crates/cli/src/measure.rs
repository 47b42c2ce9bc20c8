//! Measurement helpers every benchmark shares: the median (with min and max) of repeated
//! timings and the process's peak memory.

/// Median, min and max of a non-empty list of timings.
pub fn median_min_max(xs: Vec<f64>) -> (f64, f64, f64) {
    let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (demovlp_data::bench::median(xs), min, max)
}

/// Peak resident set size of this process (VmHWM) in MiB; NaN where /proc is unavailable.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or(f64::NAN, |kb| kb / 1024.0)
}
