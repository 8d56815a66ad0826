"""Late chunking through Python: one forward over the whole text, one vector per chunk."""

import numpy as np
import pytest

import jv4


TEXT = "The first sentence is here. A second one follows it. Ünïcödé closes the text 🙂."
SPANS = [(0, 27), (28, 52), (53, len(TEXT))]
OTHER = "short other text"


def test_spans_and_values(engine):
    lc = engine.encode_text([TEXT, OTHER], late_chunking=[SPANS, [(0, 5), (6, 16)]], truncate_dim=128,
                            return_multivector=True)
    assert isinstance(lc, jv4.LateChunks) and len(lc) == 2
    assert list(lc.offsets) == [0, 3, 5]
    assert lc.embeddings.shape == (5, 128) and lc.embeddings.dtype == np.float32
    assert np.allclose(np.linalg.norm(lc.embeddings.astype(np.float64), axis=1), 1.0, atol=1e-5)
    # Character spans come back as given (str indices, the multi-byte characters included).
    assert [tuple(s) for s in lc.char_spans] == SPANS + [(0, 5), (6, 16)]
    whole = engine.encode([TEXT, OTHER], output="multi")
    for i in range(2):
        ts = lc.token_spans[lc.offsets[i]:lc.offsets[i + 1]]
        assert ts[0][0] > 0  # the prompt prefix belongs to no chunk
        assert all(a < b <= whole.tokens[i] for a, b in ts)
        assert all(ts[k][1] <= ts[k + 1][0] for k in range(len(ts) - 1))
        # A chunk's multi-vector rows are the whole text's rows at its tokens (the same forward).
        for c in range(lc.offsets[i], lc.offsets[i + 1]):
            a, b = lc.token_spans[c]
            assert np.allclose(lc.multivectors[c], whole.multivectors[i][a:b], atol=1e-6)
    assert len({v.tobytes() for v in lc.embeddings}) == 5
    # A request's vectors do not depend on what else is in its batch.
    alone = engine.encode_text([TEXT], late_chunking=[SPANS], truncate_dim=128)
    assert np.array_equal(alone.embeddings, lc.embeddings[:3])


def test_chunk_size_in_tokens(engine):
    lc = engine.encode_text([TEXT], late_chunking=4)
    n = engine.encode([TEXT]).tokens[0]
    ts, cs = lc.token_spans, lc.char_spans
    assert lc.embeddings.shape == (len(ts), engine.hidden_size)
    assert all(0 < b - a <= 4 for a, b in ts)
    assert all(ts[k][1] == ts[k + 1][0] for k in range(len(ts) - 1))  # consecutive
    assert ts[-1][1] == n
    assert cs[0][0] == 0 and cs[-1][1] == len(TEXT)


def test_long_late_chunking(model_dir, engine):
    """A text longer than max_length: overlapping macro-chunks of max_length tokens, each chunk
    pooled in the one that owns it. Chunks cover the whole text; those in the first macro-chunk
    are the one-forward ones (causal attention: the tokens after them change nothing); the result
    does not depend on the batch."""
    from conftest import DEVICE

    small = jv4.Engine(model_dir, device=DEVICE, max_length=48, late_chunk_overlap=8, preprocess_threads=2)
    long_text = " ".join([TEXT] * 6)
    n = engine.encode([long_text], prompt_name="passage").tokens[0]
    assert n > 2 * 48
    lc = small.encode_document([long_text, OTHER], late_chunking=4, return_multivector=True)
    ts, cs = lc.token_spans[: lc.offsets[1]], lc.char_spans[: lc.offsets[1]]
    assert all(0 < b - a <= 4 for a, b in ts) and all(ts[k][1] == ts[k + 1][0] for k in range(len(ts) - 1))
    assert ts[-1][1] == n and cs[0][0] == 0 and cs[-1][1] == len(long_text)
    assert np.allclose(np.linalg.norm(lc.embeddings.astype(np.float64), axis=1), 1.0, atol=1e-5)
    r = small.encode([long_text], prompt_name="passage", output="multi", late_chunking=4)
    assert r.tokens[0] == n and r.dropped[0] == 0 and r.multivectors[0].shape == (n, small.multi_dim)
    # One forward over the whole text (the default max_length): the same chunk spans.
    one = engine.encode_document([long_text], late_chunking=4)
    assert np.array_equal(one.token_spans, ts)
    first = [k for k, (a, b) in enumerate(ts) if b <= 48 - 8]  # surely in the first macro-chunk
    assert len(first) >= 3
    close = np.sum(lc.embeddings[first].astype(np.float64) * one.embeddings[first], axis=1)
    assert np.all(close > 1 - (1e-5 if DEVICE == "cpu" else 1e-3)), close  # bf16 kernels at other lengths
    later = slice(len(ts) // 2, len(ts))  # less context than in one forward: other vectors
    assert not np.allclose(lc.embeddings[later], one.embeddings[later], atol=1e-3)
    alone = small.encode_document([long_text], late_chunking=4)
    assert np.array_equal(alone.embeddings, lc.embeddings[: lc.offsets[1]])
    # A chunk longer than a forward cannot be pooled from one.
    with pytest.raises(jv4.InputError, match="one forward holds"):
        small.encode_text([long_text], late_chunking=[[(0, len(long_text))]])
