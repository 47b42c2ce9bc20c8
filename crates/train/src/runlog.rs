//! What a run leaves beside its checkpoints: the JSONL log (one object per line: start,
//! step, skipped, eval / epoch, early_stop, error, end), the loss and recall plots drawn
//! from it, and the summary table.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use demovlp_retrieval::RetrievalMetrics;
use serde_json::json;

use crate::plot::{line_chart, Series};
use crate::run_types::RunResult;

pub(crate) struct Log {
    /// None: a log that writes nothing (the ranks other than 0 of a data-parallel run).
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
}

impl Log {
    pub(crate) fn open(path: &Path, append: bool) -> Result<Log> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(path)
            .with_context(|| format!("opening log {}", path.display()))?;
        Ok(Log { file: Some(file), path: path.to_path_buf() })
    }

    /// A log that writes nothing.
    pub(crate) fn disabled() -> Log {
        Log { file: None, path: Default::default() }
    }

    pub(crate) fn write(&mut self, v: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.file {
            writeln!(f, "{v}").with_context(|| format!("cannot write {}", self.path.display()))?;
        }
        Ok(())
    }
}

pub fn metrics_json(m: &RetrievalMetrics) -> serde_json::Value {
    let d = |x: &demovlp_retrieval::DirectionMetrics| json!({"R1": x.r1, "R5": x.r5, "R10": x.r10, "R50": x.r50, "MedR": x.medr, "MeanR": x.meanr, "geometric_mean_R1-R5-R10": x.geometric_mean_r1_r5_r10});
    json!({"t2v": d(&m.t2v), "v2t": d(&m.v2t)})
}

/// Loss curves and recall per epoch from the JSONL log (last entry per step wins, so a
/// resumed run's re-done steps replace the old ones).
pub fn write_plots(out: &Path, name: &str) -> Result<()> {
    let text = std::fs::read_to_string(out.join("log.jsonl")).unwrap_or_default();
    let mut steps = std::collections::BTreeMap::new();
    let mut evals = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        match v["kind"].as_str() {
            Some("step") => {
                steps.insert(v["step"].as_u64().unwrap_or(0), v);
            }
            Some("eval") => {
                evals.insert(v["epoch"].as_u64().unwrap_or(0), v);
            }
            _ => {}
        }
    }
    let series = |key: &str| Series {
        name: key.into(),
        points: steps.iter().filter_map(|(s, v)| v[key].as_f64().map(|y| (*s as f64, y))).collect(),
    };
    let svg =
        line_chart(&format!("{name}: training loss"), "step", "loss", &[series("loss_avg"), series("loss_global"), series("loss_local")]);
    std::fs::write(out.join("loss.svg"), svg).with_context(|| format!("cannot write {}", out.join("loss.svg").display()))?;
    let mut rs = Vec::new();
    for dir in ["t2v", "v2t"] {
        for k in ["R1", "R5", "R10"] {
            rs.push(Series {
                name: format!("{dir} {k}"),
                points: evals.iter().filter_map(|(e, v)| v["metrics"][dir][k].as_f64().map(|y| (*e as f64, y))).collect(),
            });
        }
    }
    let svg = line_chart(&format!("{name}: validation recall"), "epoch", "recall (%)", &rs);
    std::fs::write(out.join("recall.svg"), svg).with_context(|| format!("cannot write {}", out.join("recall.svg").display()))?;
    Ok(())
}

/// The summary table of a run; `task_lines` (the task's lines about its last evaluation)
/// stand before the checkpoint paths.
pub(crate) fn summary_table<E>(name: &str, r: &RunResult<E>, task_lines: &str) -> String {
    let mut s = String::new();
    let line = "-".repeat(60);
    s += &format!("{line}\n run {:<30} {}\n{line}\n", name, if r.interrupted { "INTERRUPTED (resumable)" } else { "done" });
    s += &format!(" {:<24} {}\n", "steps", r.steps);
    s += &format!(" {:<24} {}\n", "epochs", r.epochs_done);
    s += &format!(" {:<24} {:.1}\n", "seconds", r.seconds);
    s += &format!(" {:<24} {}\n", "skipped samples", r.skipped_samples);
    if let Some(b) = r.best {
        s += &format!(" {:<24} {b:.3} (epoch {})\n", format!("best {}", r.monitor), r.best_epoch.unwrap_or(0));
    }
    s += task_lines;
    s += &format!(" {:<24} {}\n", "latest checkpoint", r.latest.display());
    if let Some(b) = &r.best_checkpoint {
        s += &format!(" {:<24} {}\n", "best checkpoint", b.display());
    }
    s += &format!(" {:<24} {}\n", "log / plots", r.output_dir.join("log.jsonl").display());
    s += &format!("{line}\n");
    s
}
