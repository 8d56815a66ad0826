"""Type stubs of the native module ``jv4._jv4`` (python/src/lib.rs). Use ``jv4.Engine``."""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

__version__: str

class Engine:
    def __init__(
        self,
        model_dir: str,
        device: Union[None, str, List[str]] = None,
        *,
        max_batch_tokens: int = 16384,
        max_batch_patches: int = 16384,
        mem_budget: Union[None, int, str] = None,
        max_length: Optional[int] = None,
        strict: bool = False,
        preprocess_threads: Optional[int] = None,
        batch_wait_ms: int = 0,
        tokenizer: Optional[str] = None,
        late_chunk_overlap: Optional[int] = None,
    ) -> None: ...
    @property
    def device(self) -> str: ...
    @property
    def describe(self) -> str: ...
    @property
    def hidden_size(self) -> int: ...
    @property
    def matryoshka_dims(self) -> List[int]: ...
    @property
    def multi_dim(self) -> int: ...
    def stats(self) -> Tuple[int, int, int]: ...
    def devices(self) -> List[Tuple[str, str, Optional[str], int, int, int]]:
        """Per device: (device, describe, lost, forwards, sequences, tokens)."""
        ...
    def embed(
        self,
        inputs: Sequence[Any],
        kind: str,
        task: str = "retrieval",
        prompt_name: str = "query",
        output: str = "single",
        dims: Optional[int] = None,
        max_pixels: Optional[int] = None,
        late_chunking: Union[None, int, Sequence[Optional[Sequence[Tuple[int, int]]]]] = None,
    ) -> Dict[str, Any]:
        """Keys: n, dim, multi_dim, tokens, dropped (int64 bytearrays), errors
        (list of (index, exception)), single (f32 [n*dim]), multi_data / multi_offsets,
        chunk_offsets / chunk_tokens / chunk_chars / chunk_single / chunk_multi_data /
        chunk_multi_offsets (late chunking)."""
        ...

def fix_mmap_threshold() -> bool: ...
def _synth(out: str, seed: int = 0) -> None: ...
def _docs256(model_dir: str) -> List[str]: ...
def _time_embed(engine: Engine, texts: List[str], reps: int) -> Tuple[int, List[float]]: ...
