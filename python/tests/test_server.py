"""`jv4 serve` on the synthetic tiny model (CPU backend), called with the official `openai` client:
`client.embeddings.create(...)` with strings, token ids, `dimensions` and `encoding_format="base64"`,
results equal to the engine's called directly (the Python binding, bit for bit); then SIGTERM stops
the server cleanly (exit 0)."""

import base64
import json
import re
import signal
import subprocess
import time
import urllib.request

import numpy as np
import pytest

openai = pytest.importorskip("openai")  # absent on the GPU machine: skipped there, visibly

from conftest import DEVICE, run_cli

TEXTS = ["What is the capital of France?", "Paris is the capital of France.", "def f(x): return x"]


@pytest.fixture(scope="module")
def server(jv4_bin, model_dir):
    p = subprocess.Popen(
        [str(jv4_bin), "serve", "--model", str(model_dir), "--device", DEVICE, "--port", "0", "--api-key", "k1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = None
    t0 = time.monotonic()
    while url is None and time.monotonic() - t0 < 60:
        line = p.stderr.readline()
        if not line:
            break
        m = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
        if m:
            url = m.group(1)
    if url is None:
        p.kill()
        pytest.fail("jv4 serve did not start: " + (p.stderr.read() or ""))
    yield p, url
    if p.poll() is None:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="k1", max_retries=0, timeout=60)


def vectors(resp):
    return np.array([d.embedding for d in sorted(resp.data, key=lambda d: d.index)], dtype=np.float32)


def test_strings_equal_the_engine(client, engine):
    r = client.embeddings.create(model="jina-embeddings-v4", input=TEXTS)
    got = vectors(r)
    want = engine.encode_text(TEXTS)
    assert got.shape == want.shape
    assert np.array_equal(got, want)  # the client asked for base64 and decoded it: exact
    assert r.usage.prompt_tokens == int(engine.encode(TEXTS).tokens.sum())
    one = client.embeddings.create(model="m", input=TEXTS[0], encoding_format="float")
    assert np.array_equal(vectors(one)[0], want[0])


def test_token_ids_equal_the_engine(client, engine, jv4_bin, model_dir):
    # The prompted ids of a text (`jv4 tokenize`) embed exactly as the text does.
    out = run_cli(jv4_bin, "tokenize", "--model", model_dir, *TEXTS[:2])
    assert out.returncode == 0, out.stderr
    ids = [json.loads(line)["ids"] for line in out.stdout.splitlines()]
    want = engine.encode_text(TEXTS[:2])
    r = client.embeddings.create(model="m", input=ids)
    assert np.array_equal(vectors(r), want)
    r = client.embeddings.create(model="m", input=ids[0])
    assert np.array_equal(vectors(r)[0], want[0])


def test_dimensions_and_base64(client, engine):
    for d in engine.matryoshka_dims[:-1]:
        r = client.embeddings.create(model="m", input=TEXTS, dimensions=d, encoding_format="base64")
        raw = [np.frombuffer(base64.b64decode(x.embedding), dtype="<f4") for x in r.data]
        want = engine.encode_text(TEXTS, truncate_dim=d)
        assert np.array_equal(np.stack(raw), want)
        assert want.shape[1] == d


def test_jina_extensions_through_extra_body(client, engine):
    r = client.embeddings.create(
        model="m", input=TEXTS[:1], encoding_format="float", extra_body={"task": "code.passage"}
    )
    want = engine.encode_text(TEXTS[:1], task="code", prompt_name="passage")
    assert np.array_equal(vectors(r), want)


def test_errors_are_raised_as_the_client_expects(client, server):
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="m", input="x", dimensions=100)
    bad = openai.OpenAI(base_url=server[1] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.embeddings.create(model="m", input="x")
    with urllib.request.urlopen(server[1] + "/health") as h:
        assert json.load(h)["status"] == "ok"


def test_sigterm_stops_the_server_cleanly(server, client):
    client.embeddings.create(model="m", input="last one")
    p = server[0]
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 0
    assert "stopped" in p.stderr.read()
