"""The Python API on the CPU backend with the synthetic tiny model: shapes, norms, Matryoshka,
multi-vectors, images, equality with the Rust engine (the `jv4` CLI), threads and the GIL."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import jv4
from conftest import DEVICE, run_cli

TEXTS = [
    "What is the capital of France?",
    "Paris is the capital and largest city of France.",
    "def add(a, b):\n    return a + b",
    "Ünïcödé — 日本語のテキスト, emoji 🙂",
    "",
    "x " * 80,
]


def unit_rows(a, tol=1e-5):
    n = np.linalg.norm(a.astype(np.float64), axis=1)
    return np.all(np.abs(n - 1.0) < tol)


def test_single_vectors_shape_dtype_norm(engine):
    v = engine.encode_text(TEXTS)
    assert isinstance(v, np.ndarray)
    assert v.shape == (len(TEXTS), engine.hidden_size) and v.dtype == np.float32
    assert v.flags.c_contiguous and v.flags.writeable
    assert np.isfinite(v).all() and unit_rows(v)
    # Different texts, different vectors.
    assert len({r.tobytes() for r in v}) == len(TEXTS)
    one = engine.encode_text(TEXTS[0])
    assert one.shape == (engine.hidden_size,)
    assert np.array_equal(one, v[0])


def test_query_document_prompts_and_tasks(engine):
    q = engine.encode_query(TEXTS[:2])
    d = engine.encode_document(TEXTS[:2])
    assert np.array_equal(q, engine.encode_text(TEXTS[:2], prompt_name="query"))
    assert np.array_equal(d, engine.encode_text(TEXTS[:2], prompt_name="passage"))
    assert not np.array_equal(q, d)  # the prompt prefix differs
    # Text-matching is symmetric: both prompts are the query prompt.
    tm_q = engine.encode_query(TEXTS[:2], task="text-matching")
    tm_d = engine.encode_document(TEXTS[:2], task="text-matching")
    assert np.array_equal(tm_q, tm_d)
    code = engine.encode_query(TEXTS[:2], task="code")
    assert not np.array_equal(code, q)  # another adapter


def test_matryoshka(engine):
    full = engine.encode_text(TEXTS).astype(np.float64)
    for d in engine.matryoshka_dims:
        v = engine.encode_text(TEXTS, truncate_dim=d)
        assert v.shape == (len(TEXTS), d) and unit_rows(v)
        head = full[:, :d] / np.linalg.norm(full[:, :d], axis=1, keepdims=True)
        assert np.abs(v - head).max() < 1e-6


def test_multivectors(engine):
    mv = engine.encode_text(TEXTS, return_multivector=True)
    assert isinstance(mv, jv4.MultiVectors) and len(mv) == len(TEXTS)
    assert mv.data.dtype == np.float32 and mv.data.shape[1] == engine.multi_dim == 128
    assert mv.offsets.dtype == np.int64 and mv.offsets[0] == 0 and mv.offsets[-1] == mv.data.shape[0]
    assert unit_rows(mv.data)
    r = engine.encode(TEXTS, output="both")
    assert np.array_equal(r.tokens, np.diff(mv.offsets))  # one row per token, prompt included
    assert np.array_equal(r.multivectors.data, mv.data)
    assert np.array_equal(r.embeddings, engine.encode_text(TEXTS))
    for i, rows in enumerate(mv):
        assert rows.shape == (r.tokens[i], 128)
        assert np.shares_memory(rows, mv.data)  # a view, no copy
    single = engine.encode_text(TEXTS[1], return_multivector=True)
    assert np.array_equal(single, mv[1])


def test_truncation_reported(model_dir):
    e = jv4.Engine(model_dir, device=DEVICE, max_length=16)
    r = e.encode(["word " * 100, "short"])
    assert r.tokens[0] == 16 and r.dropped[0] > 0 and r.dropped[1] == 0
    strict = jv4.Engine(model_dir, device=DEVICE, max_length=16, strict=True)
    with pytest.raises(jv4.InputError, match="indices \\[0\\]"):
        strict.encode_text(["word " * 100, "short"])


def embed_cli(jv4_bin, model_dir, tmp_path, lines, *flags):
    inp = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(l) + "\n" for l in lines))
    r = run_cli(jv4_bin, "embed", "--model", model_dir, "--device", DEVICE, "--input", inp, "--output", out, *flags)
    assert r.returncode == 0, r.stderr
    return [json.loads(l) for l in out.read_text().splitlines()]


def test_equals_the_rust_engine(engine, jv4_bin, model_dir, tmp_path, images):
    """The same inputs through the CLI (the Rust engine, its own batches) and through Python give
    bit-identical vectors (serde_json writes the shortest f32 that round-trips)."""
    m = engine.matryoshka_dims
    for task, prompt, dims in [("retrieval", "query", None), ("code", "passage", m[0]), ("text-matching", "passage", m[1])]:
        flags = ["--task", task, "--prompt-name", prompt, "--vector", "both"]
        if dims:
            flags += ["--dims", str(dims)]
        cli = embed_cli(jv4_bin, model_dir, tmp_path, [{"text": t} for t in TEXTS], *flags)
        r = engine.encode(TEXTS, task=task, prompt_name=prompt, truncate_dim=dims, output="both")
        for i, line in enumerate(cli):
            assert np.array_equal(np.array(line["embedding"], dtype=np.float32), r.embeddings[i])
            assert np.array_equal(np.array(line["multi_vector"], dtype=np.float32), r.multivectors[i])
    files = sorted(str(p) for p in images.iterdir() if p.suffix != ".json")
    px = 16 * 28 * 28  # a small resize ceiling keeps the CPU forward short
    cli = embed_cli(jv4_bin, model_dir, tmp_path, [{"image": f, "max_pixels": px} for f in files])
    v = engine.encode_image(files, max_pixels=px)
    assert v.shape == (len(files), engine.hidden_size) and unit_rows(v)
    for i, line in enumerate(cli):
        assert np.array_equal(np.array(line["embedding"], dtype=np.float32), v[i]), files[i]


def test_image_input_forms(engine, images):
    png = images / "grad_224x224.png"
    by_path = engine.encode_image([str(png)])
    assert np.array_equal(engine.encode_image([png]), by_path)  # os.PathLike
    assert np.array_equal(engine.encode_image([png.read_bytes()]), by_path)
    assert np.array_equal(engine.encode_image([bytearray(png.read_bytes())]), by_path)
    assert np.array_equal(engine.encode_image([memoryview(png.read_bytes())]), by_path)
    assert np.array_equal(engine.encode_image(str(png)), by_path[0])
    mv = engine.encode_image([png], return_multivector=True)
    assert len(mv) == 1 and mv[0].shape[1] == 128 and unit_rows(mv.data)
    small = engine.encode(([png]), kind="image", max_pixels=28 * 28 * 4)
    assert small.tokens[0] < engine.encode([png], kind="image").tokens[0]


def test_pil_images(engine, images):
    Image = pytest.importorskip("PIL.Image")
    png = images / "grad_224x224.png"
    im = Image.open(png)
    im.load()
    v = engine.encode_image([im, png])
    # The PIL image goes in as PNG: the same pixels as the file.
    assert np.array_equal(v[0], v[1])
    assert np.array_equal(engine.encode_image(im), v[0])


def test_threads_share_one_engine(engine):
    """Many threads at once on one Engine: each gets exactly what it gets alone (bitwise)."""
    batches = [[f"thread {k} text {i} " + "word " * (i * 3 % 17) for i in range(6)] for k in range(6)]
    alone = [engine.encode_text(b, truncate_dim=128) for b in batches]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: engine.encode_text(b, truncate_dim=128), batches * 2))
    for k, v in enumerate(together):
        assert np.array_equal(v, alone[k % len(batches)])


def test_the_gil_is_released(engine):
    """While one thread waits on the engine, another runs Python: its ticks never stop for long."""
    # On a GPU the call must still last long enough to count ticks in.
    texts = ["a somewhat longer text for the engine to chew on " * 3] * (12 if DEVICE == "cpu" else 600)
    t0 = time.perf_counter()
    engine.encode_text(texts)
    alone = time.perf_counter() - t0
    ticks = []
    done = threading.Event()
    inside = threading.Event()

    def work():
        inside.set()
        engine.encode_text(texts)
        done.set()

    th = threading.Thread(target=work)
    th.start()
    inside.wait()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    th.join()
    gaps = np.diff(ticks)
    assert len(ticks) > 10, f"main thread ran {len(ticks)} times during a {alone:.2f} s call"
    assert gaps.max() < alone / 2, f"main thread stalled {gaps.max():.3f} s of a {alone:.3f} s call"


def test_engine_reports(engine):
    assert engine.device == DEVICE and DEVICE.split(":")[0] in engine.describe
    assert engine.matryoshka_dims == sorted(engine.matryoshka_dims) and engine.matryoshka_dims[-1] <= engine.hidden_size
    before = engine.stats()
    engine.encode_text(["stats"])
    after = engine.stats()
    assert after["sequences"] == before["sequences"] + 1 and after["tokens"] > before["tokens"]


def test_fix_mmap_threshold_is_glibc_only_and_keeps_large_buffers_working(engine):
    import os
    import platform

    preset = "MALLOC_MMAP_THRESHOLD_" in os.environ or "mmap_threshold" in os.environ.get("GLIBC_TUNABLES", "")
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert jv4.fix_mmap_threshold() is (glibc and not preset)
    # Large outputs after it: allocated, filled, freed as before.
    v = engine.encode_text(["word " * 400] * 4)
    assert v.shape[0] == 4 and np.isfinite(v).all()
