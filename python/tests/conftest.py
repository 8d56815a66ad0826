"""Fixtures: a synthetic tiny model (random weights in the real checkpoint layout, a few MB) on the
CPU backend, and the `jv4` binary built from the same source (the Rust engine called directly)."""

import os
import pathlib
import subprocess

import pytest

import jv4
from jv4 import _jv4

REPO = pathlib.Path(__file__).resolve().parents[2]
IMAGES = REPO / "tests" / "fixtures" / "images"
# The backend under test: the CPU (CI) or e.g. cuda:0 on a GPU machine.
DEVICE = os.environ.get("JV4_TEST_DEVICE", "cpu")
# The model under test: the synthetic tiny model (written per session) unless $JV4_TEST_MODEL
# names a model folder (e.g. `jv4 synth --preset full`, the real shapes) to run the suite on.
MODEL = os.environ.get("JV4_TEST_MODEL")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    if MODEL:
        return pathlib.Path(MODEL)
    d = tmp_path_factory.mktemp("tiny") / "model"
    _jv4._synth(str(d), seed=11)
    return d


@pytest.fixture(scope="session")
def engine(model_dir):
    return jv4.Engine(model_dir, device=DEVICE, preprocess_threads=2)


@pytest.fixture(scope="session")
def jv4_bin():
    """The CLI (`cargo build --release` writes it); $JV4_BIN overrides."""
    p = pathlib.Path(os.environ.get("JV4_BIN", REPO / "target" / "release" / "jv4"))
    if not p.is_file():
        pytest.fail(f"{p} not found: run `cargo build --release` (or set JV4_BIN)")
    return p


def run_cli(jv4_bin, *args, stdin=None):
    r = subprocess.run([str(jv4_bin), *map(str, args)], input=stdin, capture_output=True, text=True)
    return r


@pytest.fixture
def images():
    if not IMAGES.is_dir():
        pytest.fail(f"{IMAGES} missing")
    return IMAGES
