//! A run's output directory before the loop starts: never destroy an earlier run (a fresh
//! run into a directory that holds one is refused unless forced), and make every refusal
//! lead somewhere — `--resume` needs a checkpoint, and a run that stopped before writing
//! its first one (it failed on its first batch, say) is neither resumable nor worth
//! keeping: a fresh run replaces its log.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::checkpoint::{BEST, LATEST};

/// Files every run writes into its output directory, whatever the task (the task's own,
/// such as QA's `best/` folder, are passed to [`guard_output_dir`]).
pub const RUN_FILES: &[&str] = &[LATEST, BEST, "log.jsonl", "summary.txt", "loss.svg", "config.toml"];

/// Checks `out` before a run: with `resume`, a checkpoint must be there; without, a
/// directory holding a checkpoint (or one of `task_outputs`) is refused unless `force`
/// (which deletes the earlier run's files first). Returns a note for the user, if any.
pub fn guard_output_dir(out: &Path, resume: bool, force: bool, task_outputs: &[&str]) -> Result<Option<String>> {
    let latest = out.join(LATEST);
    let has_log = out.join("log.jsonl").exists();
    if resume {
        if latest.is_file() {
            return Ok(None);
        }
        if has_log {
            bail!(
                "--resume: the run in {} stopped before it wrote its first checkpoint ({LATEST} not found), so there is \
                 nothing to resume; start it again without --resume (its log is replaced)",
                out.display()
            );
        }
        bail!("--resume: there is no checkpoint to resume in {} ({LATEST} not found); start a fresh run without --resume", out.display());
    }
    let held: Vec<&str> = [LATEST, BEST].iter().chain(task_outputs).copied().filter(|f| out.join(f).exists()).collect();
    if held.is_empty() {
        return Ok(
            has_log.then(|| format!("{}: replacing the log of an earlier run that stopped before its first checkpoint", out.display()))
        );
    }
    if !force {
        bail!(
            "output_dir {} already holds a run ({}); continue it with --resume, overwrite it with --force, \
             or choose a new directory with --output-dir",
            out.display(),
            held.join(", ")
        );
    }
    for f in RUN_FILES.iter().chain(task_outputs) {
        let p = out.join(f);
        if p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("--force: removing {}", p.display()))?;
        } else if p.exists() {
            std::fs::remove_file(&p).with_context(|| format!("--force: removing {}", p.display()))?;
        }
    }
    Ok(Some(format!("--force: removed the earlier run's files in {}", out.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_lead_somewhere() {
        let dir = demovlp_testutil::tmpdir("run-dir-guard");
        // Empty: a fresh run goes, --resume is refused naming the way out.
        assert_eq!(guard_output_dir(&dir, false, false, &[]).unwrap(), None);
        let e = guard_output_dir(&dir, true, false, &[]).unwrap_err().to_string();
        assert!(e.contains("no checkpoint to resume") && e.contains("without --resume"), "{e}");
        // A run that failed on its first batch left a log and no checkpoint: a fresh run
        // replaces it (with a note), --resume says why not and what to do instead.
        std::fs::write(dir.join("log.jsonl"), "{}\n").unwrap();
        assert!(guard_output_dir(&dir, false, false, &[]).unwrap().unwrap().contains("replacing the log"));
        let e = guard_output_dir(&dir, true, false, &[]).unwrap_err().to_string();
        assert!(e.contains("before it wrote its first checkpoint") && e.contains("without --resume"), "{e}");
        // A checkpoint (or a task's own output) holds a run: refused unless forced.
        std::fs::create_dir_all(dir.join("best")).unwrap();
        let e = guard_output_dir(&dir, false, false, &["best"]).unwrap_err().to_string();
        assert!(e.contains("--resume") && e.contains("--force") && e.contains("best"), "{e}");
        assert!(guard_output_dir(&dir, false, true, &["best"]).unwrap().unwrap().contains("--force: removed"));
        assert!(!dir.join("best").exists() && !dir.join("log.jsonl").exists());
        std::fs::remove_dir_all(&dir).ok();
    }
}
