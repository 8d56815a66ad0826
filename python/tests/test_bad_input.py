"""Bad input: each a typed exception whose message names what is wrong; a bad input fails alone
and the rest of its batch is served."""

import re

import numpy as np
import pytest

import jv4
from conftest import DEVICE


def test_non_string_in_a_list_fails_alone(engine):
    texts = ["first", 42, "third", None, b"bytes"]
    with pytest.raises(jv4.InputTypeError) as ei:
        engine.encode_text(texts)
    e = ei.value
    assert isinstance(e, TypeError) and isinstance(e, jv4.InputError) and isinstance(e, jv4.Jv4Error)
    assert "3 of 5 inputs failed (indices [1, 3, 4])" in str(e)
    assert "texts[1] has type int, expected str" in str(e)
    assert "texts[3] has type NoneType" in str(e) and "texts[4] has type bytes" in str(e)
    assert sorted(e.failures) == [1, 3, 4]
    # The rest of the batch was served, exactly as alone; the failed rows are NaN.
    good = engine.encode_text(["first", "third"])
    p = e.partial.embeddings
    assert np.array_equal(p[[0, 2]], good) and np.isnan(p[[1, 3, 4]]).all()
    r = engine.encode(texts)
    assert [x is None for x in r.errors] == [True, False, True, False, False]
    assert list(r.ok) == [True, False, True, False, False]


def test_single_string_to_encode_is_refused(engine):
    with pytest.raises(jv4.InputTypeError, match="must be a list"):
        engine.encode("not a list")


def test_unknown_task(engine):
    with pytest.raises(jv4.InputError, match='unknown task "search": expected one of retrieval, text-matching, code'):
        engine.encode_text(["a"], task="search")
    with pytest.raises(ValueError):  # InputError is a ValueError
        engine.encode_image([b"\x89PNG"], task="")


def test_unknown_prompt_and_output(engine):
    with pytest.raises(jv4.InputError, match='unknown prompt name "doc"'):
        engine.encode_text(["a"], prompt_name="doc")
    with pytest.raises(jv4.InputError, match='output "all": expected single, multi or both'):
        engine.encode(["a"], output="all")
    with pytest.raises(jv4.InputError, match='kind "audio"'):
        engine.encode(["a"], kind="audio")


@pytest.mark.parametrize("dim", [100, 0, -64, 4096])
def test_truncate_dim_not_in_the_matryoshka_set(engine, dim):
    sizes = re.escape(str(engine.matryoshka_dims))
    with pytest.raises(jv4.InputError, match=f"truncate_dim={dim} is not one of the Matryoshka sizes {sizes}"):
        engine.encode_text(["a"], truncate_dim=dim)


def test_invalid_image_bytes_fail_alone(engine, images):
    png = (images / "grad_224x224.png").read_bytes()
    batch = [png, b"definitely not an image", png[: len(png) // 3], str(images / "missing.png"), 3.5]
    r = engine.encode(batch, kind="image")
    assert r.errors[0] is None
    assert isinstance(r.errors[1], jv4.InputError) and "unrecognised image format" in str(r.errors[1])
    assert isinstance(r.errors[2], jv4.InputError)  # truncated PNG
    assert isinstance(r.errors[3], jv4.IoError) and isinstance(r.errors[3], OSError)
    assert "missing.png" in str(r.errors[3])
    assert isinstance(r.errors[4], jv4.InputTypeError) and "images[4] has type float" in str(r.errors[4])
    assert np.array_equal(r.embeddings[0], engine.encode_image(png))
    assert np.isnan(r.embeddings[1:]).all()
    with pytest.raises(jv4.InputError, match="4 of 5 inputs failed \\(indices \\[1, 2, 3, 4\\]\\)"):
        engine.encode_image(batch)


def test_lone_surrogate_is_an_input_error(engine):
    r = engine.encode(["fine", "bad \ud800 surrogate"])
    assert r.errors[0] is None
    assert isinstance(r.errors[1], jv4.InputError) and "texts[1] is not valid UTF-8" in str(r.errors[1])


def test_late_chunking_bad_arguments(engine):
    text = "one two three four five"
    with pytest.raises(jv4.InputError, match="must not be negative"):
        engine.encode_text([text], late_chunking=-1)
    with pytest.raises(jv4.InputError, match="2 span lists for 1 texts"):
        engine.encode_text([text], late_chunking=[[(0, 3)], [(0, 3)]])
    with pytest.raises(jv4.InputError, match="list of \\(start, end\\) integer pairs"):
        engine.encode_text([text], late_chunking=[["a"]])
    with pytest.raises(jv4.InputError, match=r"span \(0, 99\) is outside the text \(23 characters\)"):
        engine.encode_text([text], late_chunking=[[(0, 99)]])
    with pytest.raises(jv4.InputError, match="texts only"):
        engine.encode([b"x"], kind="image", late_chunking=4)
    # Refused by the engine (a chunk size of 0; overlapping spans): a clear error, the rest served.
    with pytest.raises(jv4.InputError):
        engine.encode_text([text], late_chunking=0)
    r = engine.encode([text, text], late_chunking=[[(0, 7), (4, 9)], None])
    assert isinstance(r.errors[0], jv4.InputError) and r.errors[1] is None


def test_engine_options(model_dir, tmp_path):
    with pytest.raises(jv4.InputError, match='device "gpu": expected cpu, cuda or cuda:N'):
        jv4.Engine(model_dir, device="gpu")
    with pytest.raises(jv4.InputError, match="max_batch_tokens"):
        jv4.Engine(model_dir, device=DEVICE, max_batch_tokens=0)
    with pytest.raises(jv4.InputError, match="mem_budget"):
        jv4.Engine(model_dir, device=DEVICE, mem_budget=[1])
    with pytest.raises(jv4.Jv4Error) as ei:
        jv4.Engine(tmp_path / "nowhere", device=DEVICE)
    assert "nowhere" in str(ei.value) and isinstance(ei.value, (jv4.IoError, jv4.ModelError, jv4.TokenizerError))


def test_no_gpu_is_a_typed_error(model_dir):
    try:
        e = jv4.Engine(model_dir, device="cuda:0")
    except jv4.NoGpuError as err:
        assert isinstance(err, RuntimeError) and "no GPU" in str(err)
    else:
        assert e.device == "cuda:0"  # a GPU machine: the engine opened it
        assert e.encode_text(["gpu"]).shape == (1, e.hidden_size)
