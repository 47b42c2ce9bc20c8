//! Annotation readers on the real published files (testdata/annotations) and, for the
//! layouts whose files are not redistributable (MSR-VTT, LSMDC), on small files written here.
//! Expected counts come from Python's csv/json modules on the same files.

use std::path::PathBuf;

use demovlp_data::annotations::*;

fn ann(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/annotations").join(name)
}

fn read(name: &str) -> Vec<Sample> {
    let a = read_annotations(&ann(name), None, false).unwrap();
    assert!(a.skipped.is_empty());
    a.samples
}

#[test]
fn webvid_and_cc3m_keep_first_line_and_csv_quoting() {
    let w = read("webvid_validation_success_full.tsv");
    assert_eq!(w.len(), 4998); // 5239 physical lines: quoted captions span several
    assert_eq!(w[0].clip, "027701_027750/1053841541");
    assert_eq!(w[0].captions, vec!["Travel blogger shoot a story on top of mountains. young man holds camera in forest."]);
    assert_eq!(w[4997].clip, "005251_005300/1030221938");
    let quoted = w.iter().find(|s| s.captions[0].starts_with("A rotating pandoro")).unwrap();
    assert_eq!(quoted.clip, "195501_195550/1007078764");
    assert!(quoted.captions[0].ends_with("time-lapse.\n"), "{:?}", quoted.captions[0]);
    assert!(w.iter().all(|s| !s.clip.contains('\t') && !s.clip.contains('"')));

    let c = read("cc3m_validation_success_full.tsv");
    assert_eq!(c.len(), 12741);
    assert_eq!(c[0], Sample { clip: "0_1595581236".into(), captions: vec!["author : a life in photography -- in pictures".into()] });
    assert_eq!(c[12740].clip, "15839_3034518230");
}

#[test]
fn didemo_and_msvd() {
    for (name, n) in [("DiDeMo_train.tsv", 8392), ("DiDeMo_val.tsv", 1065), ("DiDeMo_test.tsv", 1004)] {
        assert_eq!(read(name).len(), n, "{name}");
    }
    let d = read("DiDeMo_val.tsv");
    assert_eq!(d[0].clip, "10175347@N00_4841555141_4eeb6a515a");
    assert!(d[0].captions[0].starts_with("the baby moves more than halfway out of frame., the baby puts"));
    assert!(d[0].captions[0].ends_with("half in view., "), "whole paragraph kept");
    for (name, n) in [("MSVD_train.tsv", 1200), ("MSVD_val.tsv", 100), ("MSVD_test.tsv", 670)] {
        assert_eq!(read(name).len(), n, "{name}");
    }
    let m = read("MSVD_train.tsv");
    assert_eq!(m[0], Sample { clip: "-4wsuPCjDBc_5_15".into(), captions: vec!["a squirrel is eating a peanut in it s shell".into()] });
}

#[test]
fn qa_and_multiple_choice() {
    let mc = read_msrvtt_mc(&ann("msrvtt_mc_test.jsonl")).unwrap();
    assert_eq!(mc.len(), 2990);
    assert_eq!((mc[0].clip.as_str(), mc[0].answer, mc[0].options.len()), ("video9770", 0, 5));
    assert_eq!((mc[2989].qid.as_str(), mc[2989].answer), ("mc2989", 2));

    let vocab = read_ans2label(&ann("msrvtt_train_ans2label.json")).unwrap();
    let qa = read_jsonl_qa(&ann("msrvtt_qa_val.jsonl"), &vocab).unwrap();
    assert_eq!(qa.len(), 12278);
    assert_eq!(qa.iter().filter(|q| q.label.is_some()).count(), 11419);
    assert_eq!((qa[0].clip.as_str(), qa[0].answer.as_str(), qa[0].answer_type.as_str()), ("video6513", "couch", "what"));

    let vocab = read_ans2label(&ann("frameqa_trainval_ans2label.json")).unwrap();
    let tg = read_jsonl_qa(&ann("frameqa_val.jsonl"), &vocab).unwrap();
    assert_eq!(tg.len(), 3939);
    assert!(tg.iter().all(|q| q.label.is_some()));
    assert_eq!(tg[0].clip, "tumblr_naoj3mY3AN1tczeo1o1_400");
    assert_eq!(read_jsonl_qa(&ann("frameqa_test.jsonl"), &vocab).unwrap().len(), 13691);

    let msvd = read_msvd_qa(&ann("msvd_val_qa_encode.json"), &ann("msvd_answer_set.txt"), &ann("msvd_youtube_mapping.txt")).unwrap();
    assert_eq!(msvd.len(), 6415);
    assert_eq!(msvd.iter().filter(|q| q.label.is_some()).count(), 5740);
    assert_eq!((msvd[0].clip.as_str(), msvd[0].answer_type.as_str()), ("bQJQGoJF7_k_162_169", "who"));
    assert_eq!(msvd[6414].clip, "jdAbpLooDgM_10_15");
}

#[test]
fn msrvtt_cuts_from_published_layout() {
    let dir = std::env::temp_dir().join(format!("demovlp_msrvtt_{}", std::process::id()));
    let split = dir.join("high-quality/structured-symlinks");
    std::fs::create_dir_all(&split).unwrap();
    std::fs::create_dir_all(dir.join("annotation")).unwrap();
    let anns = serde_json::json!({"annotations": [
        {"image_id": "video10", "caption": "ten a", "id": 0},
        {"image_id": "video2", "caption": "two a", "id": 1},
        {"image_id": "video10", "caption": "ten b", "id": 2},
        {"image_id": "video2", "caption": "two b", "id": 3},
        {"image_id": "video7", "caption": "seven", "id": 4},
    ]});
    std::fs::write(dir.join("annotation/MSR_VTT.json"), anns.to_string()).unwrap();
    std::fs::write(split.join("train_list_jsfusion.txt"), "video7\n").unwrap();
    std::fs::write(split.join("val_list_jsfusion.txt"), "video2\nvideo10\n").unwrap();
    // pickle of {'video10': 1, 'video2': 0} as Python writes it (protocol 2)
    let pkl = demovlp_formats::pickle::write(&demovlp_formats::Value::Dict(vec![
        (demovlp_formats::Value::Str("video10".into()), demovlp_formats::Value::Int(1)),
        (demovlp_formats::Value::Str("video2".into()), demovlp_formats::Value::Int(0)),
    ]))
    .unwrap();
    std::fs::write(split.join("jsfusion_val_caption_idx.pkl"), pkl).unwrap();
    let train = read_msrvtt(&dir, MsrvttCut::JsFusion, true).unwrap();
    assert_eq!(train, vec![Sample { clip: "video7".into(), captions: vec!["seven".into()] }]);
    let test = read_msrvtt(&dir, MsrvttCut::JsFusion, false).unwrap();
    // sorted ids as pandas' groupby: "video10" < "video2"; fixed caption per video
    assert_eq!(
        test,
        vec![
            Sample { clip: "video10".into(), captions: vec!["ten b".into()] },
            Sample { clip: "video2".into(), captions: vec!["two a".into()] },
        ]
    );
    std::fs::write(split.join("train_list_full.txt"), "video2\nvideo10\n").unwrap();
    let full = read_msrvtt(&dir, MsrvttCut::FullVal, true).unwrap();
    assert_eq!(full[0].captions, vec!["ten a", "ten b"]);
    let err = format!("{:#}", read_msrvtt(&dir, MsrvttCut::Miech, true).unwrap_err());
    assert!(err.contains("train_list_miech.txt"), "{err}");
    assert!(MsrvttCut::from_name("bogus").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lsmdc_user_jsonl_and_bad_input() {
    let dir = std::env::temp_dir().join(format!("demovlp_ann_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lsmdc = dir.join("LSMDC16_annos_training.csv");
    std::fs::write(
        &lsmdc,
        "0001_American_Beauty_00.00.51.926-00.00.54.129\t00.00.51.926\t00.00.54.129\t00.00.51.000\t00.00.55.000\tSomeone looks up.\n\
1010_TITANIC_00.41.32.072-00.41.40.196\t1\t2\t3\t4\tSomeone runs, fast.\n",
    )
    .unwrap();
    let s = read_annotations(&lsmdc, None, false).unwrap().samples;
    assert_eq!(s.len(), 2, "first line kept");
    assert_eq!(s[0].clip, "0001_American_Beauty/0001_American_Beauty_00.00.51.926-00.00.54.129");
    assert_eq!(s[1].captions, vec!["Someone runs, fast."]);

    let user = dir.join("mine.jsonl");
    std::fs::write(&user, "{\"clip\": \"a/1\", \"captions\": [\"x y\", \"z\"]}\n\n{\"clip\": \"b\", \"captions\": [\"w\"]}\n").unwrap();
    let s = read_annotations(&user, None, false).unwrap().samples;
    assert_eq!(s[0], Sample { clip: "a/1".into(), captions: vec!["x y".into(), "z".into()] });
    assert_eq!(s.len(), 2);

    // Empty caption: an error naming file and line, or a counted skip.
    let bad = dir.join("webvid_bad.tsv");
    std::fs::write(&bad, "good caption\tdir/1\n\tdir/2\nalso good\tdir/3\n").unwrap();
    let err = format!("{:#}", read_annotations(&bad, None, false).unwrap_err());
    assert!(err.contains("webvid_bad.tsv:2") && err.contains("empty caption"), "{err}");
    let a = read_annotations(&bad, None, true).unwrap();
    assert_eq!(a.samples.len(), 2);
    assert_eq!(a.skipped.len(), 1);
    let userbad = dir.join("u.jsonl");
    std::fs::write(&userbad, "{\"clip\": \"a\", \"captions\": [\"\"]}\n").unwrap();
    let err = format!("{:#}", read_annotations(&userbad, None, false).unwrap_err());
    assert!(err.contains("u.jsonl:1") && err.contains("empty caption"), "{err}");

    // Unknown layout: wrong column count, unknown file name, unknown layout name.
    let three = dir.join("cc3m_three.tsv");
    std::fs::write(&three, "a\tb\tc\n").unwrap();
    let err = format!("{:#}", read_annotations(&three, None, false).unwrap_err());
    assert!(err.contains("cc3m_three.tsv:1") && err.contains("columns"), "{err}");
    let err = format!("{:#}", read_annotations(&dir.join("whatever.txt"), None, false).unwrap_err());
    assert!(err.contains("whatever.txt") && err.contains("unknown annotation layout"), "{err}");
    assert!(Layout::from_name("youcook").is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tsv_quoting_rules() {
    let r = read_tsv("\"a \"\"q\"\" b\"\tx\n\nplain \"mid\" quote\ty\r\n\"multi\nline\"\tz").unwrap();
    let f: Vec<Vec<String>> = r.iter().map(|r| r.fields.clone()).collect();
    assert_eq!(f, vec![vec!["a \"q\" b", "x"], vec!["plain \"mid\" quote", "y"], vec!["multi\nline", "z"]]);
    assert_eq!(r.iter().map(|r| r.line).collect::<Vec<_>>(), vec![1, 3, 4]);
    assert!(read_tsv("\"open\tx\n").is_err());
}
