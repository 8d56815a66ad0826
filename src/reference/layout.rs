//! Data movement: the `embedding` gather, the merger's reshape, and the row ops of `ops::rows`
//! ([`gather_rows`]: the ViT window permutation and its inverse; [`scatter_rows_f32`]: the
//! image-token splice).

/// Embedding lookup: `out[i, :] = table[ids[i], :]`, `table [vocab, dim]`, `out [ids.len(), dim]`.
/// Panics on an id ≥ vocab, naming the id.
pub fn embedding(table: &[f32], dim: usize, ids: &[u32]) -> Vec<f32> {
    assert!(dim > 0, "embedding: dim 0");
    assert_eq!(table.len() % dim, 0, "embedding: table length {} is not a multiple of {dim}", table.len());
    let vocab = table.len() / dim;
    let mut out = Vec::with_capacity(ids.len() * dim);
    for &id in ids {
        let i = id as usize;
        assert!(i < vocab, "embedding: token id {id} out of range (vocab {vocab})");
        out.extend_from_slice(&table[i * dim..(i + 1) * dim]);
    }
    out
}

/// The patch merger's reshape (docs/MODEL.md §5.5 step 2): `[N, dim]` viewed as
/// `[N/group, group·dim]`, i.e. each output row is `group` consecutive input rows concatenated.
/// Row-major storage makes this the identity on the data: the result is a copy of `x`; only the
/// row length the caller uses changes (jina-v4: group 4, 1280 → 5120). Panics if
/// `N % group != 0`.
pub fn merge_rows(x: &[f32], dim: usize, group: usize) -> Vec<f32> {
    assert!(dim > 0 && group > 0, "merge_rows: dim and group must be positive");
    assert_eq!(x.len() % dim, 0, "merge_rows: length {} is not a multiple of {dim}", x.len());
    let n = x.len() / dim;
    assert_eq!(n % group, 0, "merge_rows: {n} rows are not a multiple of group {group}");
    x.to_vec()
}

/// The `gather_rows` op: `out[i] = x[index[i]]` for rows of `row_len`, `x [rows, row_len]`,
/// `out [index.len(), row_len]`. The ViT window permutation (docs/MODEL.md §5.3: a row is one merge
/// group, `4·1280` activations) and the merger's un-permutation (§5.5 step 4: the gather with the
/// inverse permutation). Panics on an index ≥ rows, naming it.
pub fn gather_rows(x: &[f32], row_len: usize, index: &[usize]) -> Vec<f32> {
    assert!(row_len > 0, "gather_rows: row_len 0");
    assert_eq!(x.len() % row_len, 0, "gather_rows: length {} is not a multiple of {row_len}", x.len());
    let rows = x.len() / row_len;
    let mut out = Vec::with_capacity(index.len() * row_len);
    for &i in index {
        assert!(i < rows, "gather_rows: index {i} out of range ({rows} rows)");
        out.extend_from_slice(&x[i * row_len..(i + 1) * row_len]);
    }
    out
}

/// The `scatter_rows_f32` op: `out[rows[i]] = v[i]` for rows of `row_len` (the image-token splice
/// into the decoder's residual stream, docs/MODEL.md §4.3); the other rows of `out` are not touched.
/// As the kernel's contract says, a row ≥ `out`'s row count is skipped. Panics if a row appears
/// twice (the kernel would race).
pub fn scatter_rows_f32(out: &mut [f32], v: &[f32], row_len: usize, rows: &[usize]) {
    assert!(row_len > 0, "scatter_rows_f32: row_len 0");
    assert_eq!(v.len(), rows.len() * row_len, "scatter_rows_f32: v is not [rows.len(), row_len]");
    assert_eq!(out.len() % row_len, 0, "scatter_rows_f32: out is not [R, row_len]");
    let r = out.len() / row_len;
    let mut seen = vec![false; r];
    for (src, &dst) in v.chunks_exact(row_len).zip(rows) {
        if dst < r {
            assert!(!seen[dst], "scatter_rows_f32: row {dst} appears twice");
            seen[dst] = true;
            out[dst * row_len..(dst + 1) * row_len].copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedding_by_hand() {
        let table = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]; // vocab 3, dim 2
        assert_eq!(embedding(&table, 2, &[2, 0, 2]), vec![2.0, 2.5, 0.0, 0.5, 2.0, 2.5]);
        assert!(embedding(&table, 2, &[]).is_empty());
    }

    #[test]
    #[should_panic(expected = "token id 3 out of range")]
    fn embedding_rejects_out_of_range_id() {
        embedding(&[0.0; 6], 2, &[1, 3]);
    }

    #[test]
    fn merge_rows_is_identity_on_data() {
        let x: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let m = merge_rows(&x, 3, 4); // [8, 3] → [2, 12]
        assert_eq!(m, x);
        assert_eq!(m[12..24], [4, 5, 6, 7].map(|r| x[r * 3..r * 3 + 3].to_vec()).concat()[..]);
    }

    #[test]
    #[should_panic(expected = "not a multiple of group")]
    fn merge_rows_rejects_ragged() {
        merge_rows(&[0.0; 6], 2, 2);
    }

    #[test]
    fn gather_rows_by_hand() {
        // 4 rows of 2: row r = [10r, 10r + 1].
        let x: Vec<f32> = (0..4).flat_map(|r| [10.0 * r as f32, 10.0 * r as f32 + 1.0]).collect();
        let index = [2, 0, 3, 1];
        let p = gather_rows(&x, 2, &index);
        assert_eq!(p, vec![20.0, 21.0, 0.0, 1.0, 30.0, 31.0, 10.0, 11.0]);
        // The inverse permutation undoes it.
        assert_eq!(gather_rows(&p, 2, &[1, 3, 0, 2]), x);
        // Not only permutations: repeats and fewer rows.
        assert_eq!(gather_rows(&x, 2, &[3, 3]), vec![30.0, 31.0, 30.0, 31.0]);
    }

    #[test]
    #[should_panic(expected = "index 4 out of range")]
    fn gather_rows_rejects_out_of_range() {
        gather_rows(&[0.0; 8], 2, &[1, 4]);
    }

    #[test]
    fn scatter_rows_f32_by_hand() {
        let mut out = vec![-1.0; 8]; // 4 rows of 2
        scatter_rows_f32(&mut out, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, &[2, 9, 0]);
        assert_eq!(out, vec![5.0, 6.0, -1.0, -1.0, 1.0, 2.0, -1.0, -1.0]);
    }

    #[test]
    #[should_panic(expected = "appears twice")]
    fn scatter_rows_f32_rejects_repeated_rows() {
        scatter_rows_f32(&mut [0.0; 4], &[1.0; 4], 2, &[1, 1]);
    }
}
