//! RoIPool (torchvision's max RoI pooling, as detectron2's `ROIPooler("ROIPool")` calls it).
//!
//! For a box in blob pixels: start and end cells = round-half-away-from-zero(coordinate ·
//! scale), size = max(end − start + 1, 1), bin = f32(size)/out (f32 matters: a 29-cell RoI
//! has bin 13 = [26, 29) in f32 but [26, 30) in f64); bin p covers
//! [floor(p·bin), ceil((p+1)·bin)) + start, clipped to the map; an empty bin gives 0.

use rayon::prelude::*;

use crate::nms::BoxF;

/// Pools `rois` from one NHWC map `[h, w, c]` into `[R, out, out, c]`.
pub fn roi_pool(map: &[f32], h: usize, w: usize, c: usize, rois: &[BoxF], out: usize, scale: f32) -> Vec<f32> {
    let mut y = vec![0f32; rois.len() * out * out * c];
    roi_pool_into(map, h, w, c, rois, out, scale, &mut y);
    y
}

/// [`roi_pool`] into `y` (`[R, out, out, c]`, every value written).
#[allow(clippy::too_many_arguments)]
pub fn roi_pool_into(map: &[f32], h: usize, w: usize, c: usize, rois: &[BoxF], out: usize, scale: f32, y: &mut [f32]) {
    assert_eq!(map.len(), h * w * c);
    let per = out * out * c;
    assert_eq!(y.len(), rois.len() * per);
    y.par_chunks_mut(per).zip(rois.par_iter()).for_each(|(dst, r)| {
        let sw = (r[0] * scale).round() as i64;
        let sh = (r[1] * scale).round() as i64;
        let ew = (r[2] * scale).round() as i64;
        let eh = (r[3] * scale).round() as i64;
        let rw = (ew - sw + 1).max(1);
        let rh = (eh - sh + 1).max(1);
        let bw = rw as f32 / out as f32;
        let bh = rh as f32 / out as f32;
        for ph in 0..out {
            let hs = ((ph as f32 * bh).floor() as i64 + sh).clamp(0, h as i64) as usize;
            let he = ((((ph + 1) as f32) * bh).ceil() as i64 + sh).clamp(0, h as i64) as usize;
            for pw in 0..out {
                let ws = ((pw as f32 * bw).floor() as i64 + sw).clamp(0, w as i64) as usize;
                let we = ((((pw + 1) as f32) * bw).ceil() as i64 + sw).clamp(0, w as i64) as usize;
                let o = &mut dst[(ph * out + pw) * c..(ph * out + pw + 1) * c];
                if he <= hs || we <= ws {
                    o.fill(0.0);
                    continue;
                }
                o.fill(f32::NEG_INFINITY);
                for yy in hs..he {
                    for xx in ws..we {
                        let at = (yy * w + xx) * c;
                        for (m, &v) in o.iter_mut().zip(&map[at..at + c]) {
                            if v > *m {
                                *m = v;
                            }
                        }
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_f32() {
        // A 29-cell RoI (cells 0..=28): in f32 bin 13 ends at ceil(14·(29/14)) = 29, so the
        // last bin is [26, 29); in f64 14·(29/14) = 29.000000000000004 → 30.
        let (h, w) = (1, 40);
        let map: Vec<f32> = (0..w).map(|x| x as f32).collect();
        let y = roi_pool(&map, h, w, 1, &[[0.0, 0.0, 28.0 * 16.0, 0.0]], 14, 1.0 / 16.0);
        // Row 0 holds the max over each column bin; bin 13's max is cell 28, not 29.
        assert_eq!(y[13], 28.0);
        assert_eq!(y[0], 2.0); // [0, ceil(29/14)=3)
    }
}
