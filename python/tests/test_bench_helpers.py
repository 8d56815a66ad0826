"""The throughput check's helpers (tools/py_docs_bench.py): the docs256 texts have the mix's token
counts, and the Rust-side timing embeds exactly what encode_document does."""

import numpy as np

from jv4 import _jv4


def test_docs256_texts_and_the_rust_timing(engine, model_dir):
    docs = _jv4._docs256(str(model_dir))
    assert len(docs) == 256 and docs == _jv4._docs256(str(model_dir))  # deterministic
    want = [16 + (i * 7919) % 1009 for i in range(256)]
    short = sorted(range(256), key=lambda i: want[i])[:8]  # the CPU forward is slow: 8 short ones
    texts = [docs[i] for i in short]
    got = engine.encode(texts, prompt_name="passage").tokens
    # Cut at the token that reaches the length; re-tokenizing the cut text may merge one more.
    assert np.all(np.abs(got - np.array([want[i] for i in short])) <= 1), (got, [want[i] for i in short])
    tokens, times = _jv4._time_embed(engine._engine, texts, 2)
    assert tokens == got.sum() and len(times) == 2 and all(t > 0 for t in times)
