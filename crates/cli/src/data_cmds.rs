//! `demovlp regions | tokenize | pack | bench data`: the data layer's commands.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use demovlp_data::regions::{select_clip, FrameChoice, NpzTree};
use demovlp_data::tokenizer::{TextTokenizer, DEFAULT_MAX_LEN};

/// Write the evaluation-path model input of one clip directory (`<clip_dir>/<i>.npz`).
///
/// Picks k = min(S, V) frames (the middle of each of S segments), keeps each frame's
/// top-R regions by confidence (edge-padded, masked) and writes a safetensors file with
/// `object` f32 [k,R,2054], `mask` f32 [k,R] (1 real, 0 padding), `frames` i64 [k].
#[derive(Args)]
#[command(after_help = "Picks k = min(S, V) frames of the V stored ones (the middle frame of each of S segments), \
keeps each frame's top-R regions by confidence (edge-padded and masked when fewer), and writes a safetensors \
file with: object f32 [k,R,2054] (2048-d feature + 6-d box feature), mask f32 [k,R] (1 real, 0 padding), \
frames i64 [k] (the frame indices used).")]
pub struct RegionsArgs {
    /// Clip directory holding 0.npz, 1.npz, ... (the extractor's layout).
    pub clip_dir: PathBuf,
    /// Number of segments S (frames wanted).
    #[arg(long, default_value_t = 8)]
    pub segments: usize,
    /// Regions per frame R.
    #[arg(long, default_value_t = 30)]
    pub regions: usize,
    /// Output .safetensors file.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn regions(a: RegionsArgs) -> Result<()> {
    let dir = a.clip_dir.canonicalize().with_context(|| format!("{}: clip directory not found", a.clip_dir.display()))?;
    let clip = dir.file_name().context("clip directory has no name")?.to_string_lossy().into_owned();
    let root = dir.parent().context("clip directory has no parent")?;
    let src = NpzTree::new(root);
    let input = select_clip(&src, &clip, a.segments, a.regions, FrameChoice::Middle)?;
    input.write_safetensors(&a.out)?;
    let real: f32 = input.mask.iter().sum();
    eprintln!("{}: frames {:?}, {} real regions of {} slots -> {}", clip, input.frame_indices, real, input.mask.len(), a.out.display());
    Ok(())
}

/// Tokenize lines of stdin into padded uncased WordPiece ids.
///
/// Prints one JSON object per input line: {"input_ids": [...], "attention_mask": [...]},
/// each exactly --max-len long ([CLS] ... [SEP], padded with id 0 / mask 0).
#[derive(Args)]
#[command(after_help = "Uncased WordPiece (lower-casing, accent stripping, CJK splitting). Reads one text per line \
on stdin and prints one JSON object per line: {\"input_ids\": [...], \"attention_mask\": [...]}, \
both exactly --max-len long: [CLS] ... [SEP], truncated, padded with id 0 / mask 0.")]
pub struct TokenizeArgs {
    /// tokenizer.json, a BERT vocab.txt, a directory containing either, or `builtin`
    /// (`builtin:bert-base-uncased`, the embedded uncased WordPiece vocabulary).
    #[arg(long)]
    pub tokenizer: PathBuf,
    /// Output length (truncate / pad to exactly this many tokens).
    #[arg(long, default_value_t = DEFAULT_MAX_LEN)]
    pub max_len: usize,
}

pub fn tokenize(a: TokenizeArgs) -> Result<()> {
    if a.max_len < 2 {
        bail!("--max-len: must be at least 2 (room for [CLS] and [SEP]), got {}", a.max_len);
    }
    let tok = demovlp_train::text::load_tokenizer(&a.tokenizer)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    tokenize_stream(&tok, a.max_len, std::io::stdin().lock(), &mut out)?;
    out.flush()?;
    Ok(())
}

/// One JSON line per input line (the `tokenize` contract).
fn tokenize_stream(tok: &TextTokenizer, max_len: usize, input: impl BufRead, out: &mut impl Write) -> Result<()> {
    for (n, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("stdin line {}: not UTF-8", n + 1))?;
        let (ids, mask) = tok.encode(&line, max_len)?;
        serde_json::to_writer(&mut *out, &serde_json::json!({ "input_ids": ids, "attention_mask": mask }))?;
        out.write_all(b"\n")?;
    }
    Ok(())
}

/// Pack a tree of per-frame .npz files into a memory-mapped feature store.
///
/// Reads the clips named by the annotation file (or every clip directory with --all),
/// stores each frame's regions sorted by confidence (f32, or f16 with --fp16) in
/// shards, and writes manifest.json last: an interrupted pack never reads as complete.
/// Re-running on unchanged input does nothing. Bad clips are skipped and reported.
#[derive(Args)]
#[command(after_help = "Stores each frame's regions sorted by confidence in shards memory-mapped at training time \
(f32, or f16 with --fp16), an index clip id -> frames, and manifest.json written last: an interrupted pack never \
reads as complete. Re-running on unchanged input does nothing. Bad clips and annotation lines are left out and \
listed with their reasons; unless --skip-bad allows it, `pack` then exits with status 1 (also when it packed \
nothing). The last stdout line is one JSON object: out, clips, frames, regions, bytes, up_to_date, skipped_clips, \
skipped_annotation_records, seconds.")]
pub struct PackArgs {
    /// Feature root: <root>/<clip>/<i>.npz.
    #[arg(long)]
    pub features: PathBuf,
    /// Annotation file naming the clips (layout detected from its name unless --layout).
    #[arg(long, required_unless_present = "all")]
    pub annotations: Option<PathBuf>,
    /// Annotation layout: webvid, cc3m, didemo, msvd, lsmdc, jsonl, msrvtt (--annotations =
    /// the metadata directory with annotation/MSR_VTT.json), msrvtt-mc, msrvtt-qa, tgif-frameqa.
    #[arg(long)]
    pub layout: Option<String>,
    /// MSR-VTT cut for --layout msrvtt: jsfusion, miech, full-val, full-test.
    #[arg(long, default_value = "jsfusion")]
    pub msrvtt_cut: String,
    /// Pack every clip directory directly below --features instead of an annotation file.
    #[arg(long)]
    pub all: bool,
    /// Output store directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Store the 2048-d features as fp16 (half the size; box features stay f32).
    #[arg(long)]
    pub fp16: bool,
    /// Regions kept per frame (most confident first).
    #[arg(long, default_value_t = 100)]
    pub max_regions: usize,
    /// Reader threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Clip boxes that reach outside the image to it (default: such a frame is an error
    /// and its clip is left out).
    #[arg(long)]
    pub clip_boxes: bool,
    /// Accept dropping bad annotation lines and unreadable clips (they are counted and
    /// listed); without it any drop makes `pack` exit with status 1 after writing the store.
    #[arg(long)]
    pub skip_bad: bool,
}

/// The layouts `pack --layout` takes (as its --help lists them).
const PACK_LAYOUTS: &str = "webvid, cc3m, didemo, msvd, lsmdc, jsonl, msrvtt, msrvtt-mc, msrvtt-qa, tgif-frameqa";

pub fn pack(a: PackArgs) -> Result<()> {
    use demovlp_data::annotations::{read_annotations, Layout};
    use demovlp_data::pack::{list_clip_dirs, pack, PackConfig, StoreDtype};
    if !a.features.is_dir() {
        bail!("--features: {} is not a directory of clip features", a.features.display());
    }
    if let Some(p) = a.annotations.as_ref().filter(|p| !a.all && !p.exists()) {
        bail!("--annotations: {} not found", p.display());
    }
    let mut skipped_records = Vec::new();
    let clips: Vec<String> = match &a.annotations {
        Some(path) if !a.all => match a.layout.as_deref() {
            // MSR-VTT: --annotations is the metadata directory; pack train + test of the cut.
            Some("msrvtt") => {
                use demovlp_data::annotations::{read_msrvtt, MsrvttCut};
                let cut = MsrvttCut::from_name(&a.msrvtt_cut)?;
                let mut clips: Vec<String> = read_msrvtt(path, cut, true)?.into_iter().map(|s| s.clip).collect();
                clips.extend(read_msrvtt(path, cut, false)?.into_iter().map(|s| s.clip));
                clips
            }
            Some("msrvtt-mc") => demovlp_data::annotations::read_msrvtt_mc(path)?.into_iter().map(|s| s.clip).collect(),
            Some("msrvtt-qa") | Some("tgif-frameqa") => {
                demovlp_data::annotations::read_jsonl_qa(path, &Default::default())?.into_iter().map(|s| s.clip).collect()
            }
            Some(name) if Layout::from_name(name).is_err() => {
                bail!("--layout: unknown annotation layout {name:?} (known: {PACK_LAYOUTS})")
            }
            layout => {
                let layout = match layout {
                    Some(name) => Some(Layout::from_name(name)?),
                    None => Some(Layout::detect(path).map_err(|_| {
                        anyhow::anyhow!(
                            "{}: cannot tell the annotation layout from the file name; name it with --layout ({PACK_LAYOUTS})",
                            path.display()
                        )
                    })?),
                };
                let ann = read_annotations(path, layout, true)?;
                skipped_records = ann.skipped;
                ann.samples.into_iter().map(|s| s.clip).collect()
            }
        },
        _ => list_clip_dirs(&a.features)?,
    };
    let cfg = PackConfig {
        dtype: if a.fp16 { StoreDtype::F16 } else { StoreDtype::F32 },
        max_regions: a.max_regions,
        threads: a.threads,
        progress: !a.quiet,
        clip_boxes: a.clip_boxes,
    };
    let t = std::time::Instant::now();
    let s = pack(&a.features, &clips, &a.out, &cfg)?;
    if s.up_to_date {
        println!("{}: up to date (same input and options), nothing written", a.out.display());
    }
    println!(
        "packed {} clips, {} frames, {} regions, {} bytes ({:.1} MiB, {}) into {} in {:.1}s",
        s.clips,
        s.frames,
        s.regions,
        s.bytes,
        s.bytes as f64 / (1 << 20) as f64,
        if a.fp16 { "fp16" } else { "f32" },
        a.out.display(),
        t.elapsed().as_secs_f64()
    );
    for r in &skipped_records {
        println!("skipped annotation record: {r}");
    }
    if !s.skipped.is_empty() {
        // Group by the whole reason (with the clip's own name replaced), then show examples.
        let mut by_reason: std::collections::BTreeMap<String, usize> = Default::default();
        for (clip, r) in &s.skipped {
            *by_reason.entry(r.replace(clip.as_str(), "<clip>")).or_default() += 1;
        }
        println!("skipped {} clips:", s.skipped.len());
        for (reason, n) in by_reason {
            println!("  {n:>6}  {reason}");
        }
        for (clip, r) in s.skipped.iter().take(10) {
            println!("  e.g. {clip}: {r}");
        }
    } else {
        println!("skipped 0 clips");
    }
    println!(
        "{}",
        serde_json::json!({
            "out": a.out.display().to_string(), "clips": s.clips, "frames": s.frames, "regions": s.regions, "bytes": s.bytes,
            "up_to_date": s.up_to_date, "skipped_clips": s.skipped.len(), "skipped_annotation_records": skipped_records.len(),
            "seconds": t.elapsed().as_secs_f64(),
        })
    );
    if s.clips == 0 && !s.up_to_date {
        bail!("packed nothing: none of the {} clips named could be read (see the reasons above)", clips.len());
    }
    if !a.skip_bad && (!skipped_records.is_empty() || !s.skipped.is_empty()) {
        bail!(
            "dropped {} annotation records and {} clips (listed above); the store {} was written without them. \
             Fix the input, or pass --skip-bad to accept skipping",
            skipped_records.len(),
            s.skipped.len(),
            a.out.display()
        );
    }
    Ok(())
}

/// Clips/s for load + region selection: per-frame .npz files vs the packed store.
///
/// Without --features a synthetic corpus (deflated .npz, like the extractor's) is
/// written to a temporary directory first. Reports the median of --runs runs with one
/// thread and with all threads, and the packed/npz ratio.
#[derive(Args)]
#[command(after_help = "Without --features a synthetic corpus of deflated .npz files is written to a temporary \
directory and packed. Prints clips/s (median of --runs) for 1 thread and all threads, and packed/npz ratio.")]
pub struct BenchDataArgs {
    /// Feature root to measure (default: a synthetic corpus).
    #[arg(long)]
    pub features: Option<PathBuf>,
    /// Synthetic corpus: number of clips.
    #[arg(long, default_value_t = 64)]
    pub clips: usize,
    /// Synthetic corpus: frames per clip.
    #[arg(long, default_value_t = 8)]
    pub frames: usize,
    /// Synthetic corpus: regions per frame.
    #[arg(long, default_value_t = 50)]
    pub corpus_regions: usize,
    /// Segments S selected per clip.
    #[arg(long, default_value_t = 8)]
    pub segments: usize,
    /// Regions R selected per frame.
    #[arg(long, default_value_t = 30)]
    pub regions: usize,
    /// Runs per configuration (median reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// "All threads" count (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Store the packed copy as fp16.
    #[arg(long)]
    pub fp16: bool,
}

pub fn bench_data(a: BenchDataArgs) -> Result<()> {
    use demovlp_data::bench::{clips_per_second, median, write_synthetic_clip};
    use demovlp_data::pack::{list_clip_dirs, pack, PackConfig, PackedStore, StoreDtype};
    use demovlp_data::regions::FeatureSource;
    let work = std::env::temp_dir().join(format!("demovlp_bench_data_{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let root = match &a.features {
        Some(r) => r.clone(),
        None => {
            let root = work.join("npz");
            eprintln!("writing synthetic corpus: {} clips x {} frames x {} regions (deflated .npz)", a.clips, a.frames, a.corpus_regions);
            for i in 0..a.clips {
                write_synthetic_clip(&root, &format!("clip{i:05}"), a.frames, a.corpus_regions, i as u64, true)?;
            }
            root
        }
    };
    let clips = list_clip_dirs(&root)?;
    anyhow::ensure!(!clips.is_empty(), "{}: no clip directories with 0.npz", root.display());
    let store_dir = work.join("packed");
    let cfg = PackConfig { dtype: if a.fp16 { StoreDtype::F16 } else { StoreDtype::F32 }, progress: false, ..Default::default() };
    let s = pack(&root, &clips, &store_dir, &cfg)?;
    anyhow::ensure!(s.skipped.is_empty(), "benchmark corpus has bad clips: {:?}", &s.skipped[..s.skipped.len().min(3)]);
    let npz = NpzTree::new(&root);
    let packed = PackedStore::open(&store_dir)?;
    let all = if a.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { a.threads };
    println!("load + select, {} clips, S = {}, R = {}, median of {} runs", clips.len(), a.segments, a.regions, a.runs.max(1));
    println!("{:<10} {:>8} {:>14} {:>14} {:>8}", "threads", "", "npz clips/s", "packed clips/s", "ratio");
    let mut thread_counts = vec![1];
    if all > 1 {
        thread_counts.push(all);
    }
    for &t in &thread_counts {
        let measure = |src: &dyn FeatureSource| -> Result<f64> {
            clips_per_second(src, &clips, a.segments, a.regions, t)?; // warm the page cache
            Ok(median((0..a.runs.max(1)).map(|_| clips_per_second(src, &clips, a.segments, a.regions, t)).collect::<Result<Vec<_>>>()?))
        };
        let n = measure(&npz)?;
        let p = measure(&packed)?;
        println!("{:<10} {:>8} {:>14.1} {:>14.1} {:>7.1}x", t, if t == 1 { "(1 core)" } else { "(all)" }, n, p, p / n);
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    use demovlp_testutil::testdata_dir as testdata;

    /// Header of a safetensors file: name -> (dtype, shape, byte length).
    fn header(bytes: &[u8]) -> serde_json::Value {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        serde_json::from_slice(&bytes[8..8 + n]).unwrap()
    }

    #[test]
    fn regions_command_writes_the_contract() {
        let out = std::env::temp_dir().join(format!("demovlp_regions_cmd_{}.safetensors", std::process::id()));
        regions(RegionsArgs { clip_dir: testdata().join("region_features/video9771"), segments: 8, regions: 30, out: out.clone() })
            .unwrap();
        let bytes = std::fs::read(&out).unwrap();
        let h = header(&bytes);
        // video9771 has 4 frames: k = min(8, 4) = 4, every frame in order.
        assert_eq!(h["object"]["dtype"], "F32");
        assert_eq!(h["object"]["shape"], serde_json::json!([4, 30, 2054]));
        assert_eq!(h["mask"]["shape"], serde_json::json!([4, 30]));
        assert_eq!((h["frames"]["dtype"].as_str(), &h["frames"]["shape"]), (Some("I64"), &serde_json::json!([4])));
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let off = h["frames"]["data_offsets"][0].as_u64().unwrap() as usize;
        let frames: Vec<i64> = bytes[8 + n + off..8 + n + off + 32].chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(frames, vec![0, 1, 2, 3]);
        let off = h["mask"]["data_offsets"][0].as_u64().unwrap() as usize;
        let real: f32 = bytes[8 + n + off..8 + n + off + 4 * 120].chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).sum();
        assert_eq!(real, (30 + 29 + 30 + 18) as f32); // region_counts of the fixture
        std::fs::remove_file(&out).unwrap();
        let err = regions(RegionsArgs { clip_dir: testdata().join("region_features/nope"), segments: 8, regions: 30, out }).unwrap_err();
        assert!(format!("{err:#}").contains("nope"));
    }

    #[test]
    fn tokenize_command_prints_one_json_object_per_line() {
        let tok = TextTokenizer::from_path(&testdata().join("bert-base-uncased")).unwrap();
        let mut out = Vec::new();
        tokenize_stream(&tok, 6, "a dog\n\nCafé crème brûlée naïve\n".as_bytes(), &mut out).unwrap();
        let lines: Vec<serde_json::Value> = std::str::from_utf8(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0], serde_json::json!({"input_ids": [101, 1037, 3899, 102, 0, 0], "attention_mask": [1, 1, 1, 1, 0, 0]}));
        assert_eq!(lines[1]["input_ids"], serde_json::json!([101, 102, 0, 0, 0, 0]));
        assert_eq!(lines[2]["attention_mask"], serde_json::json!([1, 1, 1, 1, 1, 1]));
        assert_eq!(lines[2]["input_ids"][5], 102);
    }
}
