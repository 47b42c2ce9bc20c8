//! `demovlp extract`, the binary, end to end: videos made with ffmpeg's test sources →
//! region features → `pack` → `index`. Also its failures: a missing weight key, an
//! undecodable video (error, or a counted skip with --skip-bad), ffmpeg not installed, and
//! resuming. Needs the `ffmpeg` program: skipped with a notice when it is absent, except
//! under CI (`CI` set), where that is a failure (.ci/run installs it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use demovlp_extract::synth::random_state_dict;
use demovlp_extract::weights::Arch;
use demovlp_formats::Npz;
use demovlp_model::io::safetensors::write_safetensors;
use demovlp_testutil::{testdata, tmpdir};

fn demovlp() -> Command {
    Command::new(env!("CARGO_BIN_EXE_demovlp"))
}

/// `demovlp extract <--videos|--images> SRC --weights W --out OUT`.
fn extract(kind: &str, src: &Path, weights: &Path, out: &Path) -> Command {
    let mut c = demovlp();
    c.args(["extract", kind]).arg(src).arg("--weights").arg(weights).arg("--out").arg(out);
    c
}

fn have_ffmpeg() -> bool {
    let ok = Command::new("ffmpeg").arg("-version").output().is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var_os("CI").is_some() {
            panic!("CI is set but the ffmpeg program is not installed");
        }
        eprintln!("SKIPPED: the ffmpeg program is not installed (apt-get install ffmpeg)");
    }
    ok
}

fn ffmpeg(args: &[&str]) {
    let o = Command::new("ffmpeg").args(["-v", "error", "-y"]).args(args).output().unwrap();
    assert!(o.status.success(), "ffmpeg {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "exit {:?}: {}", o.status.code(), String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(out.lines().last().unwrap_or_default()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn fails_naming(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains(what), "error does not name {what:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// Videos in three containers, one of them in a sub-folder, and a still image.
fn make_videos(root: &Path) -> PathBuf {
    let v = root.join("videos");
    std::fs::create_dir_all(v.join("more")).unwrap();
    ffmpeg(&["-f", "lavfi", "-i", "testsrc=size=160x120:rate=10", "-t", "3", "-pix_fmt", "yuv420p", v.join("a.mp4").to_str().unwrap()]);
    ffmpeg(&["-f", "lavfi", "-i", "testsrc2=size=96x128:rate=5", "-t", "2", v.join("more/b.mkv").to_str().unwrap()]);
    ffmpeg(&["-f", "lavfi", "-i", "testsrc=size=64x48:rate=3", "-t", "1", v.join("c.gif").to_str().unwrap()]);
    v
}

#[test]
fn extract_videos_then_pack_and_index() {
    if !have_ffmpeg() {
        return;
    }
    let root = tmpdir("extract-cli");
    let videos = make_videos(&root);
    let feats = root.join("features");
    let w = testdata("extract/bua_tiny.pth");
    let run = |extra: &[&str]| extract("--videos", &videos, &w, &feats).args(["--frames", "4", "--json"]).args(extra).output().unwrap();
    // The fixture's weights (64-d features): layout, clip names, frame counts.
    let s = ok(&run(&["--thumbnails"]));
    assert_eq!((s["clips"].as_u64(), s["extracted"].as_u64(), s["frames"].as_u64()), (Some(3), Some(3), Some(11)), "{s}");
    for (clip, frames, h, wd) in [("a", 4, 120, 160), ("more/b", 4, 128, 96), ("c", 3, 48, 64)] {
        for i in 0..frames {
            let npz = Npz::open(&feats.join(format!("{clip}/{i}.npz"))).unwrap();
            let n = npz.array("num_bbox").unwrap().scalar_i64().unwrap() as usize;
            assert!(n >= 10 || n > 0, "{clip}/{i}: {n} regions");
            assert_eq!(npz.array("x").unwrap().shape, vec![n, 64]);
            assert_eq!(npz.array("image_h").unwrap().scalar_i64().unwrap(), h);
            assert_eq!(npz.array("image_w").unwrap().scalar_i64().unwrap(), wd);
            assert_eq!(npz.object("info").unwrap().get("image_id").and_then(|v| v.as_str().map(String::from)), Some(i.to_string()));
            assert!(feats.join(format!("{clip}/{i}.jpg")).is_file(), "{clip}/{i}.jpg");
        }
        assert!(!feats.join(format!("{clip}/{frames}.npz")).exists());
    }
    // A rerun skips every finished clip.
    let s = ok(&run(&[]));
    assert_eq!((s["skipped_existing"].as_u64(), s["extracted"].as_u64()), (Some(3), Some(0)), "{s}");

    // An undecodable file: an error naming it, or a counted skip.
    std::fs::write(videos.join("broken.mp4"), b"not a video at all").unwrap();
    fails_naming(&run(&[]), "broken.mp4");
    assert!(!feats.join("broken").exists());
    let s = ok(&run(&["--skip-bad"]));
    assert_eq!((s["skipped_bad"].as_u64(), s["skipped_existing"].as_u64()), (Some(1), Some(3)), "{s}");
    assert!(s["bad"][0]["file"].as_str().unwrap().ends_with("broken.mp4"), "{s}");
    std::fs::remove_file(videos.join("broken.mp4")).unwrap();

    // ffmpeg missing: an error naming it.
    let o = extract("--videos", &videos, &w, &root.join("f2")).env("PATH", root.join("no-such-bin")).output().unwrap();
    fails_naming(&o, "ffmpeg");

    // --device cuda is refused with a message on a build without CUDA (or not wired).
    let o = extract("--images", &videos, &w, &root.join("f3")).args(["--device", "cuda"]).output().unwrap();
    fails_naming(&o, "cuda");

    // A weight file missing a key: an error naming the key.
    let mut sd = random_state_dict(&tiny_2048(), 5);
    sd.remove("roi_heads.res5.0.conv2.norm.running_var");
    let partial = root.join("partial.safetensors");
    write_safetensors(&partial, &sd.into_iter().collect::<Vec<_>>(), &[]).unwrap();
    let o = extract("--videos", &videos, &partial, &root.join("f4")).output().unwrap();
    fails_naming(&o, "roi_heads.res5.0.conv2.norm.running_var");

    // 2048-d features (a small detector with the published feature width) through pack and index.
    let wide = root.join("wide.safetensors");
    write_safetensors(&wide, &random_state_dict(&tiny_2048(), 5).into_iter().collect::<Vec<_>>(), &[]).unwrap();
    let flat = root.join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    for f in ["a.mp4", "c.gif", "more/b.mkv"] {
        std::fs::copy(videos.join(f), flat.join(Path::new(f).file_name().unwrap())).unwrap();
    }
    let feats2048 = root.join("features2048");
    let s = ok(&extract("--videos", &flat, &wide, &feats2048).args(["--frames", "3", "--json"]).output().unwrap());
    assert_eq!(s["extracted"].as_u64(), Some(3), "{s}");
    let store = root.join("store");
    let o = demovlp().args(["pack", "--all", "--quiet", "--features"]).arg(&feats2048).arg("--out").arg(&store).output().unwrap();
    assert!(o.status.success(), "pack: {}", String::from_utf8_lossy(&o.stderr));
    let model = root.join("model");
    let mut mc = demovlp_train::demo::DemoSizes::quick(1).model;
    (mc.text.dim, mc.text.hidden_dim, mc.video.dim, mc.video.mlp_dim, mc.proj_dim) = (32, 64, 32, 64, 32);
    let mut m = demovlp_model::Model::new(mc);
    m.init_random(3);
    demovlp_model::io::save_model_dir(&m, &model).unwrap();
    let index = root.join("index");
    let s = ok(&demovlp()
        .args(["index", "--all", "--model"])
        .arg(&model)
        .arg("--features")
        .arg(&store)
        .arg("--out")
        .arg(&index)
        .args(["--frames", "3", "--regions", "5", "--text-len", "24"])
        .output()
        .unwrap());
    assert_eq!((s["total_clips"].as_u64(), s["skipped"].as_array().map(Vec::len)), (Some(3), Some(0)), "{s}");
    let o = demovlp().arg("search").arg(&index).args(["a test pattern", "--json"]).output().unwrap();
    assert!(o.status.success(), "search: {}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    for clip in ["a", "b", "c"] {
        assert!(out.contains(&format!("\"{clip}\"")), "search results lack clip {clip}: {out}");
    }
}

/// A small detector whose res5 outputs the published 2048-d features.
fn tiny_2048() -> Arch {
    Arch {
        stem: 8,
        blocks: [1, 1, 1, 1],
        widths: [16, 16, 32, 2048],
        bottlenecks: [4, 8, 8, 8],
        rpn_conv: 16,
        anchors: 12,
        classes: 21,
        attributes: 11,
        cls_embed: 8,
        attr_hidden: 16,
    }
}
