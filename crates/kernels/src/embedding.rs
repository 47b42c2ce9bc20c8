//! Embedding lookup (row gather) and its backward (scatter-add).

/// out[i,:] (= or +=) table[ids[i],:]. Panics naming the id when it is outside the table.
pub fn embedding_forward(ids: &[i64], table: &[f32], dim: usize, out: &mut [f32], accumulate: bool) {
    let rows = table.len() / dim;
    for (i, &id) in ids.iter().enumerate() {
        assert!(id >= 0 && (id as usize) < rows, "embedding: id {id} outside a table of {rows} rows");
        let src = &table[id as usize * dim..(id as usize + 1) * dim];
        let dst = &mut out[i * dim..(i + 1) * dim];
        if accumulate {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
        } else {
            dst.copy_from_slice(src);
        }
    }
}

/// dtable[ids[i],:] += dout[i,:].
pub fn embedding_backward(ids: &[i64], dout: &[f32], dim: usize, dtable: &mut [f32]) {
    for (i, &id) in ids.iter().enumerate() {
        let dst = &mut dtable[id as usize * dim..(id as usize + 1) * dim];
        dst.iter_mut().zip(&dout[i * dim..(i + 1) * dim]).for_each(|(d, s)| *d += s);
    }
}
