"""jv4: jina-embeddings-v4 on NVIDIA GPUs (hand-written CUDA kernels), with an exact f32 CPU backend.

>>> import jv4
>>> engine = jv4.Engine("/models/jina-embeddings-v4", device="cuda:0")
>>> q = engine.encode_query(["how do I sort a list?"])           # [1, 2048] float32
>>> d = engine.encode_document(["Use sorted(xs).", "A cat."])     # [2, 2048] float32
>>> scores = q @ d.T                                              # unit vectors: cosine

Outputs are NumPy arrays that view the memory the engine wrote (no copy after the engine's own):

* single vectors: one ``[N, dim]`` float32 array, each row L2-normalised (``dim`` = full width, or
  ``truncate_dim``);
* multi-vectors: a :class:`MultiVectors`: one ``[T, 128]`` float32 array ``data`` holding every
  input's rows one after the other, and ``offsets`` (``[N + 1]`` int64): input ``i`` is
  ``data[offsets[i]:offsets[i + 1]]``, which ``mv[i]`` returns (a view);
* late chunking: a :class:`LateChunks` (one vector per chunk, with its token and character span).

Errors are typed (:mod:`jv4._errors`). A bad option of a call (unknown task, ``truncate_dim`` not a
Matryoshka size) raises at once. A bad *input* fails alone: the other inputs of the batch are still
embedded. ``encode_text`` / ``encode_image`` / ``encode_query`` / ``encode_document`` then raise the
first failure's exception class, whose message lists every failed index, with ``.failures``
(``{index: exception}``) and ``.partial`` (the batch's result, NaN rows where inputs failed);
:meth:`Engine.encode` never raises for an input and returns the per-input errors instead.

The GIL is released while the engine works, and one :class:`Engine` may be called from many threads
at once: concurrent calls share the engine's forwards.
"""

from __future__ import annotations

import io
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union, overload

import numpy as np

from . import _jv4
from ._errors import (
    DeviceError,
    InputError,
    InputTypeError,
    InternalError,
    IoError,
    Jv4Error,
    ModelError,
    NoGpuError,
    NonFiniteError,
    OutOfMemoryError,
    TokenizerError,
)

__version__: str = _jv4.__version__

__all__ = [
    "Engine",
    "fix_mmap_threshold",
    "Encoded",
    "MultiVectors",
    "LateChunks",
    "Jv4Error",
    "InputError",
    "InputTypeError",
    "TokenizerError",
    "IoError",
    "ModelError",
    "OutOfMemoryError",
    "NoGpuError",
    "DeviceError",
    "NonFiniteError",
    "InternalError",
]

TASKS = ("retrieval", "text-matching", "code")


def fix_mmap_threshold() -> bool:
    """Keeps a long-running process's memory flat: fixes glibc malloc's mmap threshold at 1 MiB
    (unless ``MALLOC_MMAP_THRESHOLD_`` or ``GLIBC_TUNABLES`` already sets it), so that large
    buffers (long texts' outputs, images) go back to the system when freed instead of staying in
    malloc's arenas. It changes the whole process's allocator, so the engine never calls it by
    itself; :class:`jv4.ray.Embedder` does, in its actor. Returns whether it was set (False where
    the C library is not glibc). See docs/RELIABILITY.md.
    """
    return _jv4.fix_mmap_threshold()
ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, Any]
Spans = Sequence[Tuple[int, int]]
LateChunking = Union[None, int, Sequence[Optional[Spans]]]


def _f32(buf: Any, cols: int) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.float32).reshape(-1, cols)


def _i64(buf: Any) -> np.ndarray:
    return np.frombuffer(buf, dtype=np.int64)


class MultiVectors(Sequence[np.ndarray]):
    """Per-token vectors of N inputs: ``data`` is ``[T, dim]`` float32 (every input's rows, in
    order), ``offsets`` is ``[N + 1]`` int64; ``self[i]`` is input ``i``'s ``[t_i, dim]`` rows (a
    view). A failed input has no rows."""

    __slots__ = ("data", "offsets")

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data = data
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @overload
    def __getitem__(self, i: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, i: slice) -> List[np.ndarray]: ...
    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for {n} multi-vectors")
        i %= n
        return self.data[self.offsets[i] : self.offsets[i + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"MultiVectors(n={len(self)}, rows={self.data.shape[0]}, dim={self.data.shape[1]})"


@dataclass(eq=False)
class LateChunks(Sequence[np.ndarray]):
    """Late chunking of N texts into C chunks in all: chunk ``c`` of the batch has the vector
    ``embeddings[c]`` (``[C, dim]`` float32, unit length), the token positions
    ``token_spans[c] = (start, end)`` in the embedded sequence (prompt included) and the character
    positions ``char_spans[c]`` in its text (Python ``str`` indices). Text ``i``'s chunks are rows
    ``offsets[i]:offsets[i + 1]``; ``self[i]`` returns their vectors (a view)."""

    embeddings: Optional[np.ndarray]
    offsets: np.ndarray
    token_spans: np.ndarray
    char_spans: np.ndarray
    multivectors: Optional[MultiVectors] = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        rows = slice(self.offsets[i], self.offsets[i + 1])
        if self.embeddings is None:
            assert self.multivectors is not None
            return self.multivectors[rows]
        return self.embeddings[rows]

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))


@dataclass(eq=False)
class Encoded:
    """Everything :meth:`Engine.encode` returns for N inputs, in input order."""

    #: ``[N, dim]`` float32 single vectors (NaN rows for failed inputs); None if not asked for.
    embeddings: Optional[np.ndarray]
    #: Per-token vectors; None if not asked for.
    multivectors: Optional[MultiVectors]
    #: ``[N]`` int64: tokens embedded per input (prompt included); 0 for a failed input.
    tokens: np.ndarray
    #: ``[N]`` int64: tokens cut off by truncation.
    dropped: np.ndarray
    #: Per input: None, or the exception that input failed with.
    errors: List[Optional[Jv4Error]]
    #: Late chunking's per-chunk results, when asked for.
    chunks: Optional[LateChunks] = None
    ok: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.ok = np.array([e is None for e in self.errors], dtype=bool)

    def __len__(self) -> int:
        return len(self.errors)

    def raise_errors(self) -> "Encoded":
        """Raises if any input failed (see the module documentation); returns self otherwise."""
        failed = {i: e for i, e in enumerate(self.errors) if e is not None}
        if not failed:
            return self
        first = next(iter(failed.values()))
        lines = "; ".join(f"[{i}] {e}" for i, e in failed.items())
        err = type(first)(f"{len(failed)} of {len(self)} inputs failed (indices {sorted(failed)}): {lines}")
        err.failures = failed
        err.partial = self
        raise err from first


def _unpack(d: dict, width: int) -> Encoded:
    n, dim, mdim = d["n"], d["dim"], d["multi_dim"]
    errors: List[Optional[Jv4Error]] = [None] * n
    for i, e in d["errors"]:
        errors[i] = e
    single = _f32(d["single"], dim) if "single" in d else None
    multi = MultiVectors(_f32(d["multi_data"], mdim), _i64(d["multi_offsets"])) if "multi_data" in d else None
    chunks = None
    if "chunk_offsets" in d:
        chunks = LateChunks(
            embeddings=_f32(d["chunk_single"], dim) if "chunk_single" in d else None,
            offsets=_i64(d["chunk_offsets"]),
            token_spans=_i64(d["chunk_tokens"]).reshape(-1, 2),
            char_spans=_i64(d["chunk_chars"]).reshape(-1, 2),
            multivectors=(
                MultiVectors(_f32(d["chunk_multi_data"], mdim), _i64(d["chunk_multi_offsets"]))
                if "chunk_multi_data" in d
                else None
            ),
        )
    return Encoded(single, multi, _i64(d["tokens"]), _i64(d["dropped"]), errors, chunks)


def _image_item(x: Any) -> Any:
    """An image input as the native module takes it: a path str, bytes, or bytearray."""
    if isinstance(x, (bytes, bytearray, str)):
        return x
    if isinstance(x, memoryview):
        return x.tobytes()
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    pil = sys.modules.get("PIL.Image")  # PIL only if the caller uses it: then it is imported
    if pil is not None and isinstance(x, pil.Image):
        buf = io.BytesIO()
        x.save(buf, format="PNG")
        return buf.getvalue()
    return x  # the native module reports its type for this index


def _is_single_image(x: Any) -> bool:
    if isinstance(x, (str, bytes, bytearray, memoryview, os.PathLike)):
        return True
    pil = sys.modules.get("PIL.Image")
    return pil is not None and isinstance(x, pil.Image)


class Engine:
    """A jina-embeddings-v4 model loaded on a device.

    Args:
        model_dir: the model folder (``config.json``, ``model*.safetensors``, ``adapters/``,
            ``tokenizer.json``).
        device: ``"cuda:N"`` (``"cuda"`` = ``"cuda:0"``) or ``"cpu"`` (the exact f32 forward: slow,
            for machines without a GPU and for tests); or several devices of one kind, as a list
            (``["cuda:0", "cuda:1"]``) or ``"all"`` (every GPU): one copy of the model per device,
            each forward sent to the least-loaded one, results in input order and bitwise the same
            whichever device served them (see :meth:`devices`).
        max_batch_tokens: most tokens in one forward (inputs are packed up to it).
        max_batch_patches: most image patches in one forward (a larger image is resized to fit).
        mem_budget: activation memory budget: bytes, or a size such as ``"20GiB"`` (default:
            ``$JV4_MEM_BUDGET``, else 90% of the free device memory).
        max_length: longest token sequence kept per text, prompt included (default 32768).
        strict: make a text longer than ``max_length`` an error instead of truncating it.
        preprocess_threads: CPU threads per call for image decoding.
        batch_wait_ms: how long a forward that is not full waits for other callers' inputs.
        tokenizer: a ``tokenizer.json`` to use instead of the model folder's.
        late_chunk_overlap: long late chunking (a late-chunked text longer than ``max_length``,
            embedded as overlapping macro-chunks of ``max_length`` tokens): the tokens of left
            context each macro-chunk repeats from the one before (default 512; at most half a
            macro-chunk).
    """

    def __init__(
        self,
        model_dir: Union[str, "os.PathLike[str]"],
        device: Union[str, Sequence[str]] = "cuda:0",
        *,
        max_batch_tokens: int = 16384,
        max_batch_patches: int = 16384,
        mem_budget: Union[None, int, str] = None,
        max_length: Optional[int] = None,
        strict: bool = False,
        preprocess_threads: Optional[int] = None,
        batch_wait_ms: int = 0,
        tokenizer: Union[None, str, "os.PathLike[str]"] = None,
        late_chunk_overlap: Optional[int] = None,
    ) -> None:
        self._engine = _jv4.Engine(
            os.fspath(model_dir),
            device,
            max_batch_tokens=max_batch_tokens,
            max_batch_patches=max_batch_patches,
            mem_budget=mem_budget,
            max_length=max_length,
            strict=strict,
            preprocess_threads=preprocess_threads,
            batch_wait_ms=batch_wait_ms,
            tokenizer=None if tokenizer is None else os.fspath(tokenizer),
            late_chunk_overlap=late_chunk_overlap,
        )

    @property
    def device(self) -> str:
        """``"cpu"`` or ``"cuda:N"`` (the first device, when there are several)."""
        return self._engine.device

    def devices(self) -> List[dict]:
        """Per device, in the order given: ``{"device", "describe", "lost", "forwards",
        "sequences", "tokens"}``; ``lost`` is None, or why the device was taken out of the rotation
        (its work then went to the others)."""
        keys = ("device", "describe", "lost", "forwards", "sequences", "tokens")
        return [dict(zip(keys, d)) for d in self._engine.devices()]

    @property
    def describe(self) -> str:
        """The device in words, e.g. ``cuda:0 (NVIDIA H200)``."""
        return self._engine.describe

    @property
    def hidden_size(self) -> int:
        """Width of a full single vector (2048 for the real model)."""
        return self._engine.hidden_size

    @property
    def matryoshka_dims(self) -> List[int]:
        """The widths ``truncate_dim`` accepts."""
        return list(self._engine.matryoshka_dims)

    @property
    def multi_dim(self) -> int:
        """Width of a multi-vector row (128)."""
        return self._engine.multi_dim

    def stats(self) -> dict:
        """Work done so far by this engine: ``{"forwards", "sequences", "tokens"}``."""
        f, s, t = self._engine.stats()
        return {"forwards": f, "sequences": s, "tokens": t}

    def __repr__(self) -> str:
        return f"jv4.Engine(device={self.device!r}, hidden_size={self.hidden_size})"

    def encode(
        self,
        inputs: Sequence[Any],
        *,
        kind: str = "text",
        task: str = "retrieval",
        prompt_name: Optional[str] = None,
        truncate_dim: Optional[int] = None,
        output: str = "single",
        late_chunking: LateChunking = None,
        max_pixels: Optional[int] = None,
    ) -> Encoded:
        """Embeds a batch and returns everything, with per-input errors instead of raising.

        ``kind`` is ``"text"`` (str inputs) or ``"image"`` (paths, bytes, PIL images);
        ``output`` is ``"single"``, ``"multi"`` or ``"both"`` (one forward for both). Raises only
        for a bad option of the call.
        """
        if isinstance(inputs, (str, bytes)):
            raise InputTypeError(f"inputs must be a list, not a single {type(inputs).__name__}")
        items = [_image_item(x) for x in inputs] if kind == "image" else list(inputs)
        d = self._engine.embed(
            items,
            kind,
            task=task,
            prompt_name=prompt_name or "query",
            output=output,
            dims=truncate_dim,
            max_pixels=max_pixels,
            late_chunking=late_chunking,
        )
        return _unpack(d, truncate_dim or self.hidden_size)

    def encode_text(
        self,
        texts: Union[str, Sequence[str]],
        task: str = "retrieval",
        prompt_name: Optional[str] = None,
        truncate_dim: Optional[int] = None,
        return_multivector: bool = False,
        late_chunking: LateChunking = None,
    ) -> Any:
        """Embeds texts.

        Returns a ``[N, dim]`` float32 array (a ``[dim]`` vector for a single str); with
        ``return_multivector=True`` a :class:`MultiVectors` (a ``[t, 128]`` array for a single
        str); with ``late_chunking`` (a chunk size in tokens, or per text a list of
        ``(start, end)`` character spans) a :class:`LateChunks`.

        ``prompt_name`` is ``"query"`` (default) or ``"passage"``; the text-matching task always
        uses the query prompt. Raises :class:`InputError` (or the failing kind) if any text failed:
        see the module documentation.
        """
        one = isinstance(texts, str)
        r = self.encode(
            [texts] if one else texts,
            kind="text",
            task=task,
            prompt_name=prompt_name,
            truncate_dim=truncate_dim,
            output=_output(return_multivector, late_chunking is not None),
            late_chunking=late_chunking,
        ).raise_errors()
        return _pick(r, one, return_multivector, late_chunking is not None)

    def encode_image(
        self,
        images: Union[ImageInput, Sequence[ImageInput]],
        task: str = "retrieval",
        truncate_dim: Optional[int] = None,
        return_multivector: bool = False,
        max_pixels: Optional[int] = None,
    ) -> Any:
        """Embeds images: file paths (str or ``os.PathLike``), encoded bytes (JPEG, PNG, WebP, GIF,
        BMP, TIFF) or PIL images (sent as PNG). Returns as :meth:`encode_text` does."""
        one = _is_single_image(images)
        r = self.encode(
            [images] if one else images,
            kind="image",
            task=task,
            truncate_dim=truncate_dim,
            output=_output(return_multivector, False),
            max_pixels=max_pixels,
        ).raise_errors()
        return _pick(r, one, return_multivector, False)

    def encode_query(self, texts: Union[str, Sequence[str]], **kwargs: Any) -> Any:
        """:meth:`encode_text` with the query prompt (sentence-transformers' ``encode_query``)."""
        return self.encode_text(texts, prompt_name="query", **kwargs)

    def encode_document(self, inputs: Union[str, Sequence[str]], **kwargs: Any) -> Any:
        """:meth:`encode_text` with the passage prompt (sentence-transformers'
        ``encode_document``)."""
        return self.encode_text(inputs, prompt_name="passage", **kwargs)


def _output(multi: bool, chunked: bool) -> str:
    # Late chunking with multi-vectors returns both per chunk: the vectors and their rows.
    return ("both" if chunked else "multi") if multi else "single"


def _pick(r: Encoded, one: bool, multi: bool, chunked: bool) -> Any:
    if chunked:
        return r.chunks
    out: Any = r.multivectors if multi else r.embeddings
    return out[0] if one else out
