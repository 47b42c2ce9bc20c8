//! Region selection against the reference loader's output (testdata/region_selection.safetensors).

mod common;

use common::{check_all_cases, testdata};
use demovlp_data::regions::{choose_frames, FrameChoice, NpzTree};
use demovlp_kernels::rng::Rng;

#[test]
fn npz_tree_reproduces_reference_selection() {
    check_all_cases(&NpzTree::new(testdata().join("region_features")), 0.0);
}

#[test]
fn frame_choice_rules() {
    let mut mid = FrameChoice::Middle;
    assert_eq!(choose_frames(8, 4, &mut mid).unwrap(), vec![0, 2, 4, 6]);
    assert_eq!(choose_frames(8, 1, &mut mid).unwrap(), vec![3]);
    assert_eq!(choose_frames(3, 8, &mut mid).unwrap(), vec![0, 1, 2]);
    assert_eq!(choose_frames(10, 3, &mut mid).unwrap(), vec![1, 4, 7]);
    // Training: uniform within the whole segment, including its last frame, one-frame
    // segments included; deterministic per seed.
    let mut rng = Rng::new(7);
    let mut seen = vec![[0usize; 3]; 3];
    for _ in 0..3000 {
        let f = choose_frames(9, 3, &mut FrameChoice::Random(&mut rng)).unwrap();
        for (j, &x) in f.iter().enumerate() {
            assert!(x >= 3 * j && x < 3 * j + 3);
            seen[j][x - 3 * j] += 1;
        }
    }
    for s in &seen {
        for &c in s {
            assert!(c > 850 && c < 1150, "not uniform: {seen:?}");
        }
    }
    let one = choose_frames(4, 4, &mut FrameChoice::Random(&mut Rng::new(1))).unwrap();
    assert_eq!(one, vec![0, 1, 2, 3]);
    let a = choose_frames(40, 8, &mut FrameChoice::Random(&mut Rng::new(5))).unwrap();
    let b = choose_frames(40, 8, &mut FrameChoice::Random(&mut Rng::new(5))).unwrap();
    assert_eq!(a, b);
}

#[test]
fn single_file_clip_counts_as_one_frame() {
    // CC3M images: <root>/<clip>.npz instead of a directory.
    let root = common::tmpdir("single_file");
    std::fs::copy(testdata().join("region_features/video9771/1.npz"), root.join("img_42.npz")).unwrap();
    let single = NpzTree::new(&root);
    let got = demovlp_data::select_clip(&single, "img_42", 1, 30, FrameChoice::Middle).unwrap();
    let dir = NpzTree::new(testdata().join("region_features"));
    let mut want_obj = vec![0f32; 30 * demovlp_data::TOKEN_DIM];
    let (mut want_mask, mut rows) = (vec![0f32; 30], Vec::new());
    use demovlp_data::FeatureSource;
    dir.frame_regions("video9771", 1, 30, &mut want_obj, &mut want_mask, &mut rows).unwrap();
    assert_eq!(got.frame_indices, vec![0]);
    assert!(got.object == want_obj && got.mask == want_mask && got.source_rows == rows);
    std::fs::remove_dir_all(&root).unwrap();
}
