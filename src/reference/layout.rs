//! Data movement: embedding gather, the merger's reshape, and the ViT window permutation.

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

/// The patch merger's reshape (MODEL.md §5.5 step 2): `[N, dim]` viewed as
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

/// Checks that `index` is a permutation of `0..rows` and that `x` is `[rows, row_len]`.
fn check_permutation(what: &str, x: &[f32], row_len: usize, index: &[usize]) {
    assert_eq!(x.len(), index.len() * row_len, "{what}: x is not [index.len(), row_len]");
    let mut seen = vec![false; index.len()];
    for &i in index {
        assert!(i < index.len(), "{what}: index {i} out of range ({} rows)", index.len());
        assert!(!seen[i], "{what}: index {i} appears twice");
        seen[i] = true;
    }
}

/// Row permutation (the ViT window permutation, MODEL.md §5.3): `out[i] = x[index[i]]` for rows
/// of `row_len` (for the ViT a row is one merge group, `4·1280` activations or `4·40` angles).
/// `index` must be a permutation of `0..rows`.
pub fn permute_groups(x: &[f32], row_len: usize, index: &[usize]) -> Vec<f32> {
    check_permutation("permute_groups", x, row_len, index);
    let mut out = Vec::with_capacity(x.len());
    for &i in index {
        out.extend_from_slice(&x[i * row_len..(i + 1) * row_len]);
    }
    out
}

/// The inverse of [`permute_groups`] (the merger's un-permutation, MODEL.md §5.5 step 4):
/// `out[index[i]] = x[i]`, i.e. `x[argsort(index)]`.
pub fn unpermute_groups(x: &[f32], row_len: usize, index: &[usize]) -> Vec<f32> {
    check_permutation("unpermute_groups", x, row_len, index);
    let mut out = vec![0f32; x.len()];
    for (i, &dst) in index.iter().enumerate() {
        out[dst * row_len..(dst + 1) * row_len].copy_from_slice(&x[i * row_len..(i + 1) * row_len]);
    }
    out
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
    fn permute_and_unpermute_by_hand() {
        // 4 rows of 2: row r = [10r, 10r + 1].
        let x: Vec<f32> = (0..4).flat_map(|r| [10.0 * r as f32, 10.0 * r as f32 + 1.0]).collect();
        let index = [2, 0, 3, 1];
        let p = permute_groups(&x, 2, &index);
        assert_eq!(p, vec![20.0, 21.0, 0.0, 1.0, 30.0, 31.0, 10.0, 11.0]);
        assert_eq!(unpermute_groups(&p, 2, &index), x);
        // unpermute alone: out[index[i]] = x[i].
        let u = unpermute_groups(&x, 2, &index);
        assert_eq!(u, vec![10.0, 11.0, 30.0, 31.0, 0.0, 1.0, 20.0, 21.0]);
        assert_eq!(permute_groups(&u, 2, &index), x);
    }

    #[test]
    #[should_panic(expected = "appears twice")]
    fn permute_rejects_non_permutation() {
        permute_groups(&[0.0; 4], 2, &[1, 1]);
    }
}
