//! The additive padding masks: a score added to padded positions (keys of an attention,
//! words and regions of the losses) so that their softmax weight vanishes.
//!
//! One function builds every mask, [`additive_mask`], from a 1 real / 0 padding flag; the
//! score of a padded position is [`PAD_SCORE`] (−100, the published code's `(m − 1)·100`)
//! everywhere except in the text tower's attention, which follows Hugging Face:
//! [`TEXT_ATTENTION_PAD_SCORE`].

/// Score of a padded position in the published masks: the losses' word and region masks
/// and the video tower's attention keys.
pub const PAD_SCORE: f32 = -100.0;

/// Score of a padded key in the text tower's attention. Hugging Face fills masked scores
/// with `finfo.min`, so padded keys get exactly zero weight; adding −1e30 does the same,
/// where −100 would leave them tiny (subnormal) weights and change the text tower's bits.
pub const TEXT_ATTENTION_PAD_SCORE: f32 = -1e30;

/// The additive mask value of a position flagged `m` (1 real, 0 padding): `(m − 1)·(−pad_score)`,
/// i.e. 0 for a real position and `pad_score` for a padded one.
#[inline]
pub fn additive_mask(m: f32, pad_score: f32) -> f32 {
    (m - 1.0) * -pad_score
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_is_plus_zero_padding_is_the_score() {
        assert_eq!(additive_mask(1.0, PAD_SCORE).to_bits(), 0.0f32.to_bits());
        assert_eq!(additive_mask(0.0, PAD_SCORE), -100.0);
        assert_eq!(additive_mask(0.0, TEXT_ATTENTION_PAD_SCORE), -1e30);
        // The published formula, bit for bit, for any flag value.
        for m in [0.0f32, 1.0, 0.5, 0.25, 2.0] {
            assert_eq!(additive_mask(m, PAD_SCORE).to_bits(), ((m - 1.0) * 100.0).to_bits());
        }
    }
}
