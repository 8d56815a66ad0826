"""Ray Data: embed a :class:`ray.data.Dataset` with one jv4 engine per actor.

>>> import ray, jv4.ray
>>> ds = ray.data.read_parquet("s3://bucket/docs/")            # a "text" column
>>> ds = ds.map_batches(
...     jv4.ray.Embedder,
...     fn_constructor_kwargs={"model_dir": "/models/jina-embeddings-v4", "prompt_name": "passage"},
...     batch_size=256,
...     num_gpus=1,          # one GPU per actor: the engine opens cuda:0 of the GPU Ray assigned
...     concurrency=8,       # actors (e.g. 8 GPUs across the cluster)
... )
>>> ds.write_parquet("s3://bucket/embeddings/")                # + "embedding" column

The model is loaded once per actor, in ``__init__``, inside the worker process (so CUDA is
initialised there, never in the driver). Batches come in as Ray's default (a dict of NumPy
arrays) or as pandas DataFrames; the output is the input batch plus an ``embedding`` column
(``[B, dim]`` float32) and, with ``return_multivector=True``, a ``multivector`` column (one
``[t, 128]`` float32 array per row).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import numpy as np

from . import Engine, InputError, fix_mmap_threshold

__all__ = ["Embedder"]


def _auto_device() -> str:
    # Ray sets CUDA_VISIBLE_DEVICES to the actor's GPUs: the first visible one is cuda:0.
    try:
        import ray

        if ray.is_initialized() and ray.get_gpu_ids():
            return "cuda:0"
    except ImportError:
        pass
    return "cpu"


class Embedder:
    """A callable class for ``Dataset.map_batches`` (see the module documentation).

    Args:
        model_dir: the model folder, readable on every worker (a shared file system or a copy
            per node).
        column: the input column; default ``"text"`` if the batch has one, else ``"image"``.
            A text column holds str; an image column holds paths, encoded bytes or PIL images.
        kind: ``"text"`` or ``"image"``; default ``"image"`` for a column named ``image``, else
            ``"text"``.
        device: default ``"cuda:0"`` when Ray gave the actor a GPU (``num_gpus=1``), else
            ``"cpu"``.
        task, prompt_name, truncate_dim: as in :meth:`jv4.Engine.encode_text` (``prompt_name``
            defaults to ``"passage"``: a corpus is usually documents). Images take no prompt.
        return_multivector: also write the per-token vectors.
        output_column, multivector_column: names of the columns written.
        errors: ``"raise"`` (default): a batch with a failed row fails the task, with the row's
            message; ``"column"``: failed rows get a NaN embedding and their message in an
            ``error`` column (None for the rows that were served).
        **engine_options: passed to :class:`jv4.Engine` (``max_batch_tokens``, ``mem_budget``, ...).
    """

    def __init__(
        self,
        model_dir: Union[str, "os.PathLike[str]"],
        *,
        column: Optional[str] = None,
        kind: Optional[str] = None,
        device: Optional[str] = None,
        task: str = "retrieval",
        prompt_name: str = "passage",
        truncate_dim: Optional[int] = None,
        return_multivector: bool = False,
        output_column: str = "embedding",
        multivector_column: str = "multivector",
        errors: str = "raise",
        **engine_options: Any,
    ) -> None:
        if errors not in ("raise", "column"):
            raise InputError(f"errors={errors!r}: expected 'raise' or 'column'")
        # The actor is a process of its own that embeds for hours: keep its RSS flat (the
        # jv4 binaries do the same; docs/RELIABILITY.md).
        fix_mmap_threshold()
        self.engine = Engine(model_dir, device or _auto_device(), **engine_options)
        if kind not in (None, "text", "image"):
            raise InputError(f"kind={kind!r}: expected 'text' or 'image'")
        self.column = column
        self.kind = kind
        self.task = task
        self.prompt_name = prompt_name
        self.truncate_dim = truncate_dim
        self.return_multivector = return_multivector
        self.output_column = output_column
        self.multivector_column = multivector_column
        self.errors = errors

    def _column(self, names: list) -> str:
        if self.column is not None:
            if self.column not in names:
                raise InputError(
                    f"jv4.ray.Embedder: the batch has no {self.column!r} column (it has {names})"
                )
            return self.column
        for c in ("text", "image"):
            if c in names:
                return c
        raise InputError(
            f"jv4.ray.Embedder: the batch has neither a 'text' nor an 'image' column (it has {names}); "
            "name the input column with column=..."
        )

    def __call__(self, batch: Any) -> Any:
        is_pandas = not isinstance(batch, dict)
        if is_pandas and not hasattr(batch, "iloc"):
            raise InputError(
                f"jv4.ray.Embedder takes numpy (dict) or pandas batches, not {type(batch).__name__}: "
                "use batch_format='numpy' (the default) or 'pandas'"
            )
        names = [str(c) for c in batch.columns] if is_pandas else list(batch)
        col = self._column(names)
        values = batch[col]
        items = values.tolist() if hasattr(values, "tolist") else list(values)
        kind = self.kind or ("image" if col == "image" else "text")
        r = self.engine.encode(
            items,
            kind=kind,
            task=self.task,
            prompt_name=self.prompt_name if kind == "text" else None,
            truncate_dim=self.truncate_dim,
            output="both" if self.return_multivector else "single",
        )
        failed = [(i, e) for i, e in enumerate(r.errors) if e is not None]
        if failed and self.errors == "raise":
            r.raise_errors()
        out: Dict[str, Any] = {} if is_pandas else dict(batch)
        out[self.output_column] = r.embeddings
        if self.return_multivector:
            assert r.multivectors is not None
            mv = np.empty(len(r), dtype=object)
            for i in range(len(r)):
                mv[i] = r.multivectors[i]
            out[self.multivector_column] = mv
        if self.errors == "column":
            err = np.empty(len(r), dtype=object)
            for i, e in failed:
                err[i] = str(e)
            out["error"] = err
        if is_pandas:
            batch = batch.copy()
            for k, v in out.items():
                batch[k] = list(v) if v.ndim > 1 else v
            return batch
        return out
