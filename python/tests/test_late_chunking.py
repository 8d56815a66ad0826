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
