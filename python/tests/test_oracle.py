"""The backend under test against the CPU backend (the exact f32 forward) on the same model: by
cosine (0.999 for a pooled vector, 0.99 for one multi-vector row, as the Rust GPU suite),
since a GPU runs bf16 kernels. On the CPU itself the other tests are bitwise already, so
this runs only where $JV4_TEST_DEVICE is a GPU; with a model of real size the CPU forward takes
minutes, so it runs on the synthetic tiny model only (unless $JV4_TEST_CPU_ORACLE=1)."""

import os

import numpy as np
import pytest

import jv4
from conftest import DEVICE, MODEL

pytestmark = [
    pytest.mark.skipif(DEVICE == "cpu", reason="the CPU is the oracle: the other tests compare bitwise"),
    pytest.mark.skipif(
        bool(MODEL) and os.environ.get("JV4_TEST_CPU_ORACLE") != "1",
        reason="a CPU forward of a full-size model takes minutes ($JV4_TEST_CPU_ORACLE=1 runs it)",
    ),
]

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "def add(a, b):\n    return a + b",
    "Ünïcödé — 日本語のテキスト, emoji 🙂",
    "",
    "x " * 300,
]


def cos_rows(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def cpu(model_dir):
    return jv4.Engine(model_dir, device="cpu", preprocess_threads=4)


def test_texts_against_the_cpu(engine, cpu):
    for kw in [dict(task="retrieval"), dict(task="code", prompt_name="passage"), dict(task="text-matching")]:
        g = engine.encode(TEXTS, output="both", **kw)
        c = cpu.encode(TEXTS, output="both", **kw)
        assert np.array_equal(g.tokens, c.tokens)
        single = cos_rows(g.embeddings, c.embeddings)
        assert single.min() >= 0.999, f"{kw}: single-vector cosines {single}"
        multi = cos_rows(g.multivectors.data, c.multivectors.data)
        # One bf16 row against the f32 oracle: looser than a pooled vector (as tests/common/chunk_cases.rs).
        assert multi.min() >= 0.99, f"{kw}: multi rows mean {multi.mean()}, min {multi.min()}"
    d = engine.matryoshka_dims[0]
    assert cos_rows(engine.encode_text(TEXTS, truncate_dim=d), cpu.encode_text(TEXTS, truncate_dim=d)).min() >= 0.999


def test_images_against_the_cpu(engine, cpu, images):
    files = [str(images / n) for n in ("grad_224x224.png", "round_70x42.png", "gray_100x60.png")]
    px = 64 * 28 * 28
    c = cos_rows(engine.encode_image(files, max_pixels=px), cpu.encode_image(files, max_pixels=px))
    assert c.min() >= 0.99, f"image single-vector cosines {c}"  # the vision residual stream is bf16


def test_late_chunking_against_the_cpu(model_dir, engine, cpu):
    text = " ".join(f"Sentence {i} says something about topic {i % 5}." for i in range(40))
    g = engine.encode_document([text], late_chunking=6)
    c = cpu.encode_document([text], late_chunking=6)
    assert np.array_equal(g.token_spans, c.token_spans) and np.array_equal(g.char_spans, c.char_spans)
    assert cos_rows(g.embeddings, c.embeddings).min() >= 0.999
    # Long late chunking: the same macro-chunks on both backends.
    kw = dict(max_length=64, late_chunk_overlap=8, preprocess_threads=2)
    g = jv4.Engine(model_dir, device=DEVICE, **kw).encode_document([text], late_chunking=6)
    c = jv4.Engine(model_dir, device="cpu", **kw).encode_document([text], late_chunking=6)
    assert np.array_equal(g.token_spans, c.token_spans)
    assert cos_rows(g.embeddings, c.embeddings).min() >= 0.999
