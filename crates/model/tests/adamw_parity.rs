//! One AdamW step from fresh state on the recorded parameters and gradients of the
//! published model must reproduce `after_adamw.*` (recorded by the reference trainer).
//! Needs no forward pass: the gradients come from the fixture.

use demovlp_model::io::read_safetensors;
use demovlp_model::{AdamW, ParamsBuilder};

use demovlp_testutil::testdata;

/// Unused checkpoint tensors of the video tower: present, never updated.
fn is_unused(name: &str) -> bool {
    name.starts_with("object_model.norm.") || (name.starts_with("object_model.blocks.") && name.contains(".norm3."))
}

fn check(fixture: &str) {
    let f = read_safetensors(&testdata(fixture)).unwrap();
    let cfg: serde_json::Value = serde_json::from_str(&f.metadata["config"]).unwrap();
    let a = &cfg["adamw"];
    let g = |k: &str| a[k].as_f64().unwrap() as f32;

    let mut b = ParamsBuilder::new();
    let names: Vec<String> = f.tensors.keys().filter_map(|k| k.strip_prefix("param.")).map(String::from).collect();
    for n in &names {
        let shape = &f.tensors[&format!("param.{n}")].shape;
        if is_unused(n) {
            b.add_unused(n.clone(), shape);
        } else {
            b.add(n.clone(), shape);
        }
    }
    let mut p = b.build();
    let mut with_grad = 0;
    for n in &names {
        let id = p.id(n).unwrap();
        p.get_mut(id).copy_from_slice(&f.f32(&format!("param.{n}")).unwrap());
        match f.tensors.get(&format!("grad.{n}")) {
            Some(t) => {
                assert!(!is_unused(n), "{fixture}: unused tensor {n} has a recorded gradient");
                p.grad_mut(id).copy_from_slice(t.as_f32().unwrap());
                with_grad += 1;
            }
            None => assert!(is_unused(n), "{fixture}: {n} should receive a gradient but none is recorded"),
        }
    }
    assert!(with_grad > 0);

    let before = p.data.clone();
    let mut opt = AdamW::new(p.len(), g("lr"), g("beta1"), g("beta2"), g("eps"), g("weight_decay"));
    opt.step(&mut p);

    let mut worst = (0.0f32, String::new());
    for n in &names {
        let id = p.id(n).unwrap();
        let want = f.f32(&format!("after_adamw.{n}")).unwrap();
        let got = p.get(id);
        let sp = p.spec(id);
        if !sp.receives_grad {
            assert_eq!(got, &before[sp.offset..sp.offset + sp.len], "{fixture}: unused {n} changed");
            assert_eq!(got, &want[..], "{fixture}: unused {n} differs from the recorded value");
            continue;
        }
        // The step moves each weight by about lr; compare the update itself, tightly.
        for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
            let err = (x - y).abs() / (1.0 + y.abs());
            if err > worst.0 {
                worst = (err, format!("{n}[{i}]: got {x}, want {y}"));
            }
        }
        let moved = got.iter().zip(&before[sp.offset..]).filter(|(a, b)| a != b).count();
        assert!(moved > 0, "{fixture}: {n} did not move");
    }
    eprintln!("{fixture}: worst relative error {:.3e} at {}", worst.0, worst.1);
    assert!(worst.0 < 5e-7, "{fixture}: AdamW mismatch {:.3e} at {}", worst.0, worst.1);
}

#[test]
fn adamw_step_matches_reference_model_tiny() {
    check("model_tiny.safetensors");
}

#[test]
fn adamw_step_matches_reference_model_tiny_1frame() {
    check("model_tiny_1frame.safetensors");
}
