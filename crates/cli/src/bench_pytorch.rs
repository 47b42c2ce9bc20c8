//! The PyTorch side of side-by-side benchmarks: runs `bench/pytorch_baseline.py` (our own
//! PyTorch implementation of the same model and losses, checked against the fixtures) in
//! the same invocation as the Rust measurement, so the printed ratio compares two numbers
//! taken on the same machine minutes apart.

use std::io::{BufRead, BufReader, Lines, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// When to run the PyTorch baseline beside a Rust benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    /// Run it when `python3 -c "import torch"` works; say so when it does not.
    Auto,
    /// Always run it; fail when PyTorch is missing.
    Always,
    /// Never run it.
    Never,
}

/// Options shared by the benchmarks that have a PyTorch counterpart.
#[derive(clap::Args, Clone, Debug)]
pub struct BaselineArgs {
    /// Also time the PyTorch baseline (bench/pytorch_baseline.py) in this run and print the ratio.
    #[arg(long, value_enum, default_value_t = Baseline::Auto)]
    pub pytorch: Baseline,
    /// Path of the PyTorch baseline script (default: bench/pytorch_baseline.py of this checkout).
    #[arg(long)]
    pub pytorch_script: Option<PathBuf>,
}

/// `--pytorch-script`, else `bench/<name>` of this checkout.
fn script_path(args: &BaselineArgs, name: &str) -> PathBuf {
    if let Some(p) = &args.pytorch_script {
        return p.clone();
    }
    let local = PathBuf::from("bench").join(name);
    if local.is_file() {
        return local;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bench").join(name)
}

fn torch_available() -> bool {
    Command::new("python3")
        .args(["-c", "import torch"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Whether the baseline is to run; errors for `Always` without PyTorch.
fn wanted(args: &BaselineArgs, name: &str) -> Result<Option<PathBuf>> {
    match args.pytorch {
        Baseline::Never => return Ok(None),
        Baseline::Auto if !torch_available() => {
            eprintln!("PyTorch baseline: skipped (python3 cannot import torch; see bench/README.md to install it)");
            return Ok(None);
        }
        Baseline::Always if !torch_available() => {
            bail!("--pytorch always: python3 cannot import torch (see bench/README.md to install it)")
        }
        _ => {}
    }
    let script = script_path(args, name);
    if !script.is_file() {
        bail!("PyTorch baseline script {} not found (use --pytorch-script)", script.display());
    }
    Ok(Some(script))
}

/// The baseline running in `--serve` mode: it has built its model and taken its warm-up
/// steps, and runs one timed step per [`Served::step`]. Alternating these with our own
/// steps exposes both to the same machine conditions (these VMs are noisy: two sequential
/// blocks of steps a minute apart can differ by 15 %).
pub struct Served {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

/// Starts the baseline with `mode_args` plus `--serve --json`; `None` when it is not to be
/// run. It initialises in the background; [`Served::wait_ready`] waits for it.
pub fn serve(args: &BaselineArgs, mode_args: &[String]) -> Result<Option<Served>> {
    let Some(script) = wanted(args, "pytorch_baseline.py")? else { return Ok(None) };
    eprintln!("PyTorch baseline (interleaved): python3 {} {} --serve --json", script.display(), mode_args.join(" "));
    let mut child = Command::new("python3")
        .arg(&script)
        .args(mode_args)
        .args(["--serve", "--json"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("running python3 {}", script.display()))?;
    let stdin = child.stdin.take().context("baseline stdin")?;
    let lines = BufReader::new(child.stdout.take().context("baseline stdout")?).lines();
    Ok(Some(Served { child, stdin, lines }))
}

impl Served {
    /// The next JSON line of the baseline (other lines are shown on stderr).
    fn next_json(&mut self) -> Result<Value> {
        for line in self.lines.by_ref() {
            let line = line.context("reading the PyTorch baseline's output")?;
            match serde_json::from_str::<Value>(line.trim()) {
                Ok(v) if v.is_object() => return Ok(v),
                _ => eprintln!("  [pytorch] {line}"),
            }
        }
        let status = self.child.wait().ok();
        bail!("the PyTorch baseline stopped early ({status:?})")
    }

    pub fn wait_ready(&mut self) -> Result<()> {
        let v = self.next_json()?;
        if v.get("ready").is_none() {
            bail!("the PyTorch baseline sent {v} instead of ready");
        }
        Ok(())
    }

    /// One timed baseline step: its seconds.
    pub fn step(&mut self) -> Result<f64> {
        writeln!(self.stdin, "step").context("sending a step to the PyTorch baseline")?;
        self.stdin.flush()?;
        let v = self.next_json()?;
        number(&v, "s")
    }

    /// Ends the baseline; its summary line (`median_s`, `peak_rss_mb`, …).
    pub fn finish(mut self) -> Result<Value> {
        writeln!(self.stdin, "done").context("ending the PyTorch baseline")?;
        drop(self.stdin);
        let mut last = None;
        for line in self.lines.by_ref() {
            let line = line?;
            eprintln!("  [pytorch] {line}");
            if !line.trim().is_empty() {
                last = Some(line);
            }
        }
        let status = self.child.wait()?;
        if !status.success() {
            bail!("PyTorch baseline failed with {status}");
        }
        last_json_line(&last.unwrap_or_default())
    }
}

/// Runs the baseline with `mode_args` (e.g. `["--bench", "--batch", "8"]`) plus `--json`, and
/// returns its final JSON line; `None` when it is not to be run. Its own output is passed through
/// to stderr so a person sees its progress.
pub fn run(args: &BaselineArgs, mode_args: &[String]) -> Result<Option<Value>> {
    run_script(args, "pytorch_baseline.py", mode_args)
}

/// [`run`] with another script of `bench/` (`--pytorch-script` still overrides it).
pub fn run_script(args: &BaselineArgs, name: &str, mode_args: &[String]) -> Result<Option<Value>> {
    let Some(script) = wanted(args, name)? else { return Ok(None) };
    eprintln!("PyTorch baseline: python3 {} {} --json", script.display(), mode_args.join(" "));
    let out = Command::new("python3")
        .arg(&script)
        .args(mode_args)
        .arg("--json")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running python3 {}", script.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        eprintln!("  [pytorch] {line}");
    }
    if !out.status.success() {
        bail!("PyTorch baseline {} failed with {}", script.display(), out.status);
    }
    last_json_line(&stdout).with_context(|| format!("PyTorch baseline {}: no JSON line at the end", script.display())).map(Some)
}

fn last_json_line(stdout: &str) -> Result<Value> {
    let line = stdout.lines().rev().find(|l| !l.trim().is_empty()).context("empty output")?;
    serde_json::from_str(line.trim()).with_context(|| format!("last line is not JSON: {line}"))
}

/// A number field of the baseline's JSON.
pub fn number(v: &Value, key: &str) -> Result<f64> {
    v.get(key).and_then(Value::as_f64).with_context(|| format!("PyTorch baseline JSON lacks number `{key}`"))
}

/// Prints the side-by-side lines and returns the fields to merge into the Rust JSON line.
pub fn compare(rust_median_s: f64, rust_peak_mb: f64, torch: &Value) -> Result<serde_json::Map<String, Value>> {
    let t_med = number(torch, "median_s")?;
    let t_peak = number(torch, "peak_rss_mb")?;
    println!("side by side (same run): demovlp median {rust_median_s:.3} s, peak {rust_peak_mb:.0} MB | PyTorch median {t_med:.3} s, peak {t_peak:.0} MB");
    println!("ratio demovlp/PyTorch: time {:.3}x, peak memory {:.3}x", rust_median_s / t_med, rust_peak_mb / t_peak);
    let mut m = serde_json::Map::new();
    m.insert("pytorch_median_s".into(), t_med.into());
    m.insert("pytorch_peak_rss_mb".into(), t_peak.into());
    m.insert("time_ratio_vs_pytorch".into(), (rust_median_s / t_med).into());
    m.insert("memory_ratio_vs_pytorch".into(), (rust_peak_mb / t_peak).into());
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_last_json_line_and_compares() {
        let v = last_json_line("warming up\n{\"median_s\": 2.0, \"peak_rss_mb\": 1000}\n\n").unwrap();
        let m = compare(1.0, 600.0, &v).unwrap();
        assert_eq!(m["time_ratio_vs_pytorch"], 0.5);
        assert_eq!(m["memory_ratio_vs_pytorch"], 0.6);
        assert!(last_json_line("no json here").is_err());
        assert!(compare(1.0, 1.0, &serde_json::json!({"median_s": 1.0})).is_err());
    }
}
