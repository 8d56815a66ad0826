"""Several devices behind one Engine (`device=[...]`): bitwise the same results as one device,
the work spread over them, per-device reports, and bad lists refused with a clear error.

On the CPU (CI) the list is ["cpu", "cpu"]: two workers, two copies of the model. On a machine with
one GPU the two-device cases are skipped (a CUDA device may not be listed twice)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import jv4
from conftest import DEVICE

TEXTS = [f"text {i}: " + "word " * (i * 5 % 23) for i in range(24)]
TWO = [DEVICE, DEVICE] if DEVICE == "cpu" else None


@pytest.fixture(scope="module")
def two(model_dir):
    if TWO is None:
        pytest.skip("two devices of one kind: CPU only here (one GPU cannot be listed twice)")
    # A small token budget: the texts need several forwards, which go to both workers.
    return jv4.Engine(model_dir, device=TWO, max_batch_tokens=64, preprocess_threads=2)


def test_two_devices_equal_one(engine, two, images):
    assert two.device == DEVICE and [d["device"] for d in two.devices()] == TWO
    for kw in [{}, {"truncate_dim": engine.matryoshka_dims[0], "task": "code"}, {"return_multivector": True}]:
        a = engine.encode_text(TEXTS, **kw)
        b = two.encode_text(TEXTS, **kw)
        if kw.get("return_multivector"):
            assert np.array_equal(a.offsets, b.offsets) and np.array_equal(a.data, b.data)
        else:
            assert a.shape == b.shape and np.array_equal(a, b)
    lc = dict(late_chunking=3, truncate_dim=128)
    a, b = engine.encode_document(TEXTS[:6], **lc), two.encode_document(TEXTS[:6], **lc)
    assert np.array_equal(a.embeddings, b.embeddings) and np.array_equal(a.token_spans, b.token_spans)
    png = str(images / "grad_224x224.png")
    px = 16 * 28 * 28
    assert np.array_equal(engine.encode_image([png], max_pixels=px), two.encode_image([png], max_pixels=px))


def test_work_is_spread_and_reported(two):
    before = two.devices()
    # Concurrent callers: each call's windows go to the least-loaded worker.
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: two.encode_text([f"caller {k} " + t for t in TEXTS]), range(8)))
    after = two.devices()
    assert len(after) == 2
    for b, a in zip(before, after):
        assert a["lost"] is None and "cpu" in a["describe"]
        assert a["forwards"] > b["forwards"], f"a device did no work: {after}"
    s = two.stats()
    assert s["tokens"] == sum(d["tokens"] for d in after)
    assert s["sequences"] == sum(d["sequences"] for d in after)


def test_one_device_in_a_list_is_the_plain_engine(model_dir, engine):
    one = jv4.Engine(model_dir, device=[DEVICE], preprocess_threads=2)
    assert one.device == DEVICE and len(one.devices()) == 1
    assert np.array_equal(one.encode_text(TEXTS[:4]), engine.encode_text(TEXTS[:4]))
    d = engine.devices()
    assert len(d) == 1 and d[0]["device"] == DEVICE and d[0]["lost"] is None


def test_bad_device_lists(model_dir):
    with pytest.raises(jv4.InputError, match=r"device=\[\] lists no device"):
        jv4.Engine(model_dir, device=[])
    with pytest.raises(jv4.InputError, match=r'device\[1\]: device "gpu": expected cpu, cuda or cuda:N'):
        jv4.Engine(model_dir, device=["cpu", "gpu"])
    with pytest.raises(jv4.InputTypeError, match=r"device\[0\] has type int"):
        jv4.Engine(model_dir, device=[0])
    with pytest.raises(jv4.InputTypeError, match="device has type int"):
        jv4.Engine(model_dir, device=3)
    # Refused by the engine before any model is loaded (no GPU needed to see these).
    with pytest.raises(jv4.InputError, match="all CUDA or all cpu"):
        jv4.Engine(model_dir, device=["cpu", "cuda:0"])
    with pytest.raises(jv4.InputError, match="device cuda:1 is listed twice"):
        jv4.Engine(model_dir, device=("cuda:1", "cuda:1"))
