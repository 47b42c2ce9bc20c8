//! Video-tower initialisation from timm ViT weights: `blocks.i.*` fill
//! `object_model.blocks.i.*`, everything else is skipped and counted.

use std::collections::BTreeMap;

use demovlp_model::io::{load_vit_blocks, read_safetensors, read_weights, write_safetensors, Tensor};
use demovlp_model::ParamsBuilder;

use demovlp_testutil::testdata;

#[test]
fn timm_blocks_load_non_strictly() {
    let fx = read_safetensors(&testdata("model_tiny.safetensors")).unwrap();
    let mut b = ParamsBuilder::new();
    for (k, t) in &fx.tensors {
        if let Some(n) = k.strip_prefix("param.") {
            b.add(n, &t.shape);
        }
    }
    let mut params = b.build();

    // A timm-style state dict: the recorded blocks under `blocks.i.*` (timm has no norm3),
    // plus tensors the video tower has no place for.
    let mut vit = BTreeMap::new();
    for (k, t) in &fx.tensors {
        if let Some(n) = k.strip_prefix("param.object_model.") {
            if n.starts_with("blocks.") && !n.contains(".norm3.") {
                vit.insert(n.to_string(), t.clone());
            }
        }
    }
    let blocks = vit.len();
    assert_eq!(blocks, 2 * 12);
    vit.insert("blocks.7.norm1.weight".into(), Tensor::f32(vec![64], vec![1.0; 64])); // deeper than the tower
    vit.insert("pos_embed".into(), Tensor::f32(vec![1, 197, 64], vec![0.0; 197 * 64]));
    vit.insert("patch_embed.proj.weight".into(), Tensor::f32(vec![64, 3, 2, 2], vec![0.0; 64 * 12]));
    vit.insert("head.weight".into(), Tensor::f32(vec![10, 64], vec![0.0; 640]));

    // Round-trip through a file, as a user would pass it.
    let dir = std::env::temp_dir().join(format!("demovlp-vit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("vit.safetensors");
    let list: Vec<_> = vit.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    write_safetensors(&f, &list, &[]).unwrap();
    let vit = read_weights(&f).unwrap();

    let r = load_vit_blocks(&mut params, &vit).unwrap();
    assert_eq!(r.loaded.len(), blocks);
    assert_eq!(r.skipped.len(), 4);
    assert_eq!(
        r.missing,
        vec![
            "object_model.blocks.0.norm3.bias",
            "object_model.blocks.0.norm3.weight",
            "object_model.blocks.1.norm3.bias",
            "object_model.blocks.1.norm3.weight"
        ]
    );
    for (k, t) in &vit {
        if let Some(id) = params.id(&format!("object_model.{k}")) {
            assert_eq!(params.get(id), t.as_f32().unwrap(), "{k}");
        }
    }
    // Nothing outside the blocks was touched.
    let cls = params.id("object_model.cls_token").unwrap();
    assert!(params.get(cls).iter().all(|&x| x == 0.0));

    // A shape mismatch is an error, not a silent skip.
    let mut bad = BTreeMap::new();
    bad.insert("blocks.0.attn.qkv.weight".to_string(), Tensor::f32(vec![3, 64], vec![0.0; 192]));
    assert!(load_vit_blocks(&mut params, &bad).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
