//! `demovlp extract`, the binary, end to end: videos made with ffmpeg's test sources →
//! region features → `pack` → `index` → `explain` drawing the regions on the thumbnails, and
//! `--packed` giving the bytes `pack` gives. Also its failures: a missing weight key, an
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
    let s = ok(&extract("--videos", &flat, &wide, &feats2048).args(["--frames", "3", "--thumbnails", "--json"]).output().unwrap());
    assert_eq!(s["extracted"].as_u64(), Some(3), "{s}");
    let store = root.join("store");
    let o = demovlp().args(["pack", "--all", "--quiet", "--features"]).arg(&feats2048).arg("--out").arg(&store).output().unwrap();
    assert!(o.status.success(), "pack: {}", String::from_utf8_lossy(&o.stderr));
    // --packed: the same store, byte for byte, without a separate pack run; thumbnails beside it.
    let packed = root.join("packed");
    let s = ok(&extract("--videos", &flat, &wide, &packed).args(["--frames", "3", "--thumbnails", "--packed", "--json"]).output().unwrap());
    assert_eq!((s["extracted"].as_u64(), s["packed"]["clips"].as_u64()), (Some(3), Some(3)), "{s}");
    assert_same_store(&store, &packed);
    assert!(!packed.join(".extract-npz").exists(), "the staging tree is left behind");
    for clip in ["a", "b", "c"] {
        for i in 0..3 {
            let t = format!("{clip}/{i}.jpg");
            assert_eq!(std::fs::read(packed.join(&t)).unwrap(), std::fs::read(feats2048.join(&t)).unwrap(), "{t}");
        }
    }
    // A rerun finds the store complete; a new video is refused (a store is not extended in place).
    let s = ok(&extract("--videos", &flat, &wide, &packed).args(["--frames", "3", "--packed", "--json"]).output().unwrap());
    assert_eq!((s["skipped_existing"].as_u64(), s["extracted"].as_u64()), (Some(3), Some(0)), "{s}");
    assert_same_store(&store, &packed);
    std::fs::copy(flat.join("a.mp4"), flat.join("d.mp4")).unwrap();
    fails_naming(&extract("--videos", &flat, &wide, &packed).args(["--frames", "3", "--packed"]).output().unwrap(), "\"d\"");
    std::fs::remove_file(flat.join("d.mp4")).unwrap();
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
    // The pictures: explain (as serve) draws the extracted regions on the thumbnails.
    for images in [&feats2048, &packed] {
        explain_draws_regions_on_frames(&index, &feats2048, images, "a", (120, 160));
    }
}

/// Two packed stores hold the same bytes (shards, frame index, clip list, and the manifest
/// but for its input fingerprint).
fn assert_same_store(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.path().is_file())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for n in names(a) {
        let (x, y) = (std::fs::read(a.join(&n)).unwrap(), std::fs::read(b.join(&n)).unwrap());
        if n == "manifest.json" {
            let strip = |b: &[u8]| {
                let mut m: serde_json::Value = serde_json::from_slice(b).unwrap();
                m.as_object_mut().unwrap().remove("fingerprint");
                m
            };
            assert_eq!(strip(&x), strip(&y), "manifest.json");
        } else {
            assert!(x == y, "{n} differs ({} and {} bytes)", x.len(), y.len());
        }
    }
}

/// `explain --images IMAGES --out SVG` on `clip`: each panel shows the clip's thumbnail
/// (the sampled frame, `<i>.jpg`, at the frame's aspect ratio) and every region the
/// explanation lists is drawn at its box, which is the extracted `.npz` box (the region
/// slot's row in confidence order) as fractions of the frame.
fn explain_draws_regions_on_frames(index: &Path, feats: &Path, images: &Path, clip: &str, hw: (usize, usize)) {
    use demovlp_data::regions::FrameFile;
    let svg_path = images.join("explain.svg");
    let o = demovlp()
        .arg("explain")
        .arg(index)
        .args(["--clip", clip, "a test pattern", "--json", "--images"])
        .arg(images)
        .arg("--out")
        .arg(&svg_path)
        .output()
        .unwrap();
    let e = ok(&o);
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let frames: Vec<i64> = e["frames"].as_array().unwrap().iter().map(|f| f.as_i64().unwrap()).collect();
    assert_eq!(frames, [0, 1, 2], "{e}");
    let hrefs: Vec<&str> = svg.split("href=\"data:image/jpeg;base64,").skip(1).map(|r| &r[..r.find('"').unwrap()]).collect();
    assert_eq!(hrefs.len(), 3, "one picture per panel");
    for (k, f) in frames.iter().enumerate() {
        let jpg = std::fs::read(images.join(format!("{clip}/{f}.jpg"))).unwrap();
        assert!(demovlp_testutil::b64decode(hrefs[k]) == jpg, "panel {k} does not show {clip}/{f}.jpg");
        let (h, w) = jpeg_size(&jpg);
        assert_eq!(h * hw.1, w * hw.0, "thumbnail {h}x{w} is not the {}x{} frame's shape", hw.0, hw.1);
    }
    let regions = e["regions"].as_array().unwrap();
    assert!(!regions.is_empty(), "{e}");
    assert_eq!(svg.matches("class=\"region\"").count(), regions.len());
    for r in regions {
        let (frame, slot) = (r["frame"].as_i64().unwrap(), r["region"].as_u64().unwrap() as usize);
        let ff = FrameFile::read(&feats.join(format!("{clip}/{frame}.npz"))).unwrap();
        let row = ff.sorted_rows()[slot] as usize;
        let want = &ff.box_feature(row)[..4];
        let got: Vec<f32> = r["box"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(got, want, "frame {frame} region {slot}");
        // Drawn at those fractions of its panel (320 x 240 from x = 12 + panel * 332, y = 48).
        let (x0, top) = (12.0 + r["panel"].as_u64().unwrap() as f32 * 332.0, 48.0);
        let at = format!("x=\"{:.1}\" y=\"{:.1}\"", x0 + want[0] * 320.0, top + want[1] * 240.0);
        assert!(svg.contains(&format!("class=\"region\" {at}")), "no region drawn at {at}");
    }
}

/// Height and width of a baseline or progressive JPEG (its SOF segment).
fn jpeg_size(b: &[u8]) -> (usize, usize) {
    let mut i = 2;
    while i + 9 < b.len() {
        assert_eq!(b[i], 0xFF, "JPEG segment marker");
        let (m, len) = (b[i + 1], u16::from_be_bytes([b[i + 2], b[i + 3]]) as usize);
        if (0xC0..=0xC2).contains(&m) {
            return (u16::from_be_bytes([b[i + 5], b[i + 6]]) as usize, u16::from_be_bytes([b[i + 7], b[i + 8]]) as usize);
        }
        i += 2 + len;
    }
    panic!("no JPEG frame header")
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
