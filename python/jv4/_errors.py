"""The exceptions of jv4: one base class, one subclass per kind of failure.

The native module raises these (it looks them up here by name), so that a caller can catch
``jv4.InputError`` for a bad input, ``jv4.OutOfMemoryError`` to split a batch and retry, or
``jv4.Jv4Error`` for all of them. Each also derives from the built-in exception a Python user
would expect (``ValueError``, ``TypeError``, ``OSError``, ``MemoryError``, ``RuntimeError``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional


class Jv4Error(Exception):
    """Anything that went wrong in jv4.

    When raised for a batch in which some inputs failed, ``failures`` maps each failed input's
    index to its own exception and ``partial`` holds the batch's result (the served inputs' vectors;
    NaN rows for the failed ones).
    """

    failures: Dict[int, "Jv4Error"]
    partial: Optional[Any]

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.failures = {}
        self.partial = None


class InputError(Jv4Error, ValueError):
    """An input or option is invalid (unknown task, truncate_dim not a Matryoshka size, an image
    that does not decode, a span outside its text, ...)."""


class InputTypeError(InputError, TypeError):
    """An input has the wrong Python type (e.g. a list of texts holding an int)."""


class TokenizerError(Jv4Error):
    """The tokenizer could not be loaded, or failed on a text."""


class IoError(Jv4Error, OSError):
    """A file (model, image) could not be read."""


class ModelError(Jv4Error):
    """The model folder is malformed (config, checkpoint, a tensor)."""


class OutOfMemoryError(Jv4Error, MemoryError):
    """The device memory budget cannot hold the work: free memory or send smaller batches."""


class NoGpuError(Jv4Error, RuntimeError):
    """No usable CUDA driver or GPU (use ``device="cpu"`` on a machine without one)."""


class DeviceError(Jv4Error, RuntimeError):
    """A CUDA driver, kernel or cuBLAS call failed."""


class NonFiniteError(Jv4Error, ArithmeticError):
    """The forward produced NaN or infinite values for this input (it is not returned)."""


class InternalError(Jv4Error, RuntimeError):
    """A bug or broken invariant inside the engine."""
