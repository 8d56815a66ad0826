"""Ray Data: 2,000 rows through `map_batches` with 2 CPU actors (a local cluster), checked
against the engine called directly; a batch without the input column fails clearly."""

import numpy as np
import pytest

import jv4
from conftest import DEVICE

ray = pytest.importorskip("ray")
from jv4.ray import Embedder  # noqa: E402

N = 2000
DISTINCT = 200  # rows repeat these texts, so the direct reference is cheap and still covers every row


def row_text(i):
    k = i % DISTINCT
    return f"row {k} topic {k % 13}"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


def test_map_batches_two_actors(cluster, model_dir, engine):
    ds = ray.data.from_items([{"id": i, "text": row_text(i)} for i in range(N)])
    out = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_dir": str(model_dir), "device": DEVICE, "truncate_dim": 128,
                               "preprocess_threads": 1},
        batch_size=250,
        concurrency=2,
        num_cpus=1,
    )
    rows = sorted(out.take_all(), key=lambda r: r["id"])
    assert len(rows) == N and [r["id"] for r in rows] == list(range(N))
    assert all(r["text"] == row_text(r["id"]) for r in rows)  # input columns pass through
    got = np.stack([np.asarray(r["embedding"]) for r in rows])
    want = engine.encode_document([row_text(i) for i in range(DISTINCT)], truncate_dim=128)
    assert got.shape == (N, 128) and got.dtype == np.float32
    assert np.array_equal(got, want[np.arange(N) % DISTINCT])


def test_missing_column_fails_clearly(cluster, model_dir):
    ds = ray.data.from_items([{"body": row_text(i)} for i in range(8)])
    out = ds.map_batches(Embedder, fn_constructor_kwargs={"model_dir": str(model_dir), "device": DEVICE},
                         concurrency=1, num_cpus=1)
    with pytest.raises(Exception) as ei:
        out.take_all()
    assert "the batch has neither a 'text' nor an 'image' column (it has ['body'])" in str(ei.value)


# The actor class itself, without a cluster (fast): columns, multi-vectors, errors, pandas.

@pytest.fixture(scope="module")
def embedder(model_dir):
    return Embedder(model_dir, device=DEVICE, return_multivector=True, errors="column")


def test_embedder_columns_and_errors(embedder, engine):
    texts = np.array(["alpha", "beta gamma", "delta"], dtype=object)
    texts[1] = 7  # a non-string row
    out = embedder({"text": texts, "id": np.arange(3)})
    assert list(out["id"]) == [0, 1, 2]
    e = out["embedding"]
    assert e.shape == (3, engine.hidden_size)
    assert np.array_equal(e[[0, 2]], engine.encode_document(["alpha", "delta"])) and np.isnan(e[1]).all()
    assert out["error"][0] is None and "has type int, expected str" in out["error"][1]
    mv = out["multivector"]
    assert mv.dtype == object and mv[1].shape == (0, 128)
    assert np.array_equal(mv[2], engine.encode_document(["delta"], return_multivector=True)[0])


def test_embedder_raises_by_default(model_dir):
    e = Embedder(model_dir, device=DEVICE)
    with pytest.raises(jv4.InputTypeError, match="indices \\[1\\]"):
        e({"text": np.array(["a", None], dtype=object)})
    with pytest.raises(jv4.InputError, match="no 'body' column \\(it has \\['text'\\]\\)"):
        Embedder(model_dir, device=DEVICE, column="body")({"text": np.array(["a"])})


def test_embedder_pandas_and_images(embedder, engine, images):
    pd = pytest.importorskip("pandas")
    png = (images / "grad_224x224.png").read_bytes()
    df = pd.DataFrame({"image": [png, png], "k": [1, 2]})
    out = embedder(df)
    assert list(out.columns) == ["image", "k", "embedding", "multivector", "error"]
    assert np.array_equal(np.stack(out["embedding"]), engine.encode_image([png, png]))


def test_embedder_refuses_other_batch_formats(embedder):
    pa = pytest.importorskip("pyarrow")
    with pytest.raises(jv4.InputError, match="numpy \\(dict\\) or pandas batches, not Table"):
        embedder(pa.table({"text": ["a"]}))
