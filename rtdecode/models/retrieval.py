"""Image retrieval the MindEye2 way: cosine similarity of flattened token embeddings (spec §6).

MindEye2 retrieves by flattening ``clip_voxels`` (B, 256, 1664) and the images' bigG token
embeddings to 425,984 features, L2-normalising both and ranking by their dot product. A
:class:`RetrievalIndex` holds a pool of normalised embeddings with string ids. Up to ``exact_max``
items it searches exactly with a torch matmul; above, with a FAISS inner-product index (exact
``"Flat"`` by default, or any ``faiss.index_factory`` string such as ``"HNSW32"`` or
``"IVF64,Flat"`` for an approximate one).

Saved indexes are a directory: ``index.json`` (format, backend, factory and the ids) plus either
``vectors.npy`` (torch backend) or ``index.faiss`` (``faiss.write_index``). Nothing is pickled.
"""

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from torch import Tensor

from rtdecode.errors import CheckpointError, ModelError

Backend = Literal["auto", "torch", "faiss"]
BACKENDS = ("auto", "torch", "faiss")

INDEX_FORMAT = "rtdecode-retrieval-index"
INDEX_VERSION = 1
MANIFEST_NAME = "index.json"
VECTORS_NAME = "vectors.npy"
FAISS_NAME = "index.faiss"

# Queries scored per torch matmul: bounds the (queries, items) score matrix held at once.
QUERY_CHUNK = 1024
# Saved vectors must be unit length to this tolerance (they are stored normalised).
UNIT_NORM_ATOL = 1e-3
_MAX_LISTED = 10


class Match(NamedTuple):
    """One retrieved item: its id and cosine similarity to the query."""

    id: str
    score: float


class RetrievalIndex:
    """A pool of L2-normalised embeddings with string ids, searched by cosine similarity.

    ``embeddings`` is (N, tokens, dim) or (N, features); every row is flattened and L2-normalised
    in float32. ``backend="auto"`` searches exactly with torch up to ``exact_max`` items and with a
    FAISS ``faiss_factory`` index above; ``"torch"`` and ``"faiss"`` force one. A torch pool stays on
    the device its tensor came from. For approximate factories, tune search parameters on
    :attr:`faiss_index` (e.g. ``faiss.extract_index_ivf(index.faiss_index).nprobe = 8``).
    """

    def __init__(
        self,
        ids: Sequence[str],
        embeddings: Tensor | np.ndarray,
        *,
        backend: Backend = "auto",
        exact_max: int = 4096,
        faiss_factory: str = "Flat",
    ) -> None:
        if backend not in BACKENDS:
            raise ModelError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if not isinstance(exact_max, int) or exact_max < 0:
            raise ModelError(f"exact_max must be a non-negative integer, got {exact_max!r}")
        vectors = _unit_rows(_as_matrix(embeddings, "embeddings", allowed_ndims=(2, 3)), "embeddings")
        self._ids = _checked_ids(ids, n_items=vectors.shape[0])
        self._n_features = vectors.shape[1]
        self.faiss_factory = faiss_factory
        if backend == "auto":
            backend = "torch" if len(self._ids) <= exact_max else "faiss"
        self.backend: Literal["torch", "faiss"] = backend
        self._vectors: Tensor | None = vectors if backend == "torch" else None
        self._faiss_index = _built_faiss_index(vectors, faiss_factory) if backend == "faiss" else None

    @property
    def ids(self) -> tuple[str, ...]:
        return self._ids

    @property
    def n_features(self) -> int:
        """Length of a flattened embedding (425,984 = 256 x 1664 for MindEye2)."""
        return self._n_features

    @property
    def faiss_index(self) -> Any:
        """The FAISS index of a ``"faiss"`` backend (None for torch), to tune search parameters."""
        return self._faiss_index

    def __len__(self) -> int:
        return len(self._ids)

    def search(self, queries: Tensor | np.ndarray, k: int = 5) -> list[list[Match]]:
        """The ``k`` most cosine-similar items for each query, best first.

        ``queries`` is (Q, tokens, dim) or (Q, features), flattened to the pool's width (a single
        query needs its batch axis). ``k`` must be between 1 and the pool size: asking for more items
        than the pool holds is an error, not clamped, so a short result never passes unnoticed.
        Approximate FAISS indexes may still return fewer than ``k`` matches for a query.
        """
        if not isinstance(k, int) or not 1 <= k <= len(self):
            raise ModelError(f"k must be an integer from 1 to the pool size {len(self)}, got {k!r}")
        matrix = _as_matrix(queries, "queries", allowed_ndims=(2, 3))
        if matrix.shape[1] != self._n_features:
            raise ModelError(
                f"queries flatten to {matrix.shape[1]} features per query (shape {tuple(queries.shape)}), "
                f"but the pool's embeddings have {self._n_features}"
            )
        unit_queries = _unit_rows(matrix, "queries")
        if self._faiss_index is not None:
            scores, indices = self._search_faiss(unit_queries, k)
        else:
            scores, indices = self._search_torch(unit_queries, k)
        return [self._matches(row_scores, row_indices) for row_scores, row_indices in zip(scores, indices, strict=True)]

    def _matches(self, scores: Tensor | np.ndarray, indices: Tensor | np.ndarray) -> list[Match]:
        """One query's results as Matches; FAISS marks missing results (approximate indexes) with -1."""
        pairs = zip(scores.tolist(), indices.tolist(), strict=True)
        return [Match(self._ids[index], float(score)) for score, index in pairs if index >= 0]

    def _search_torch(self, unit_queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Exact float32 cosine top-k, ``QUERY_CHUNK`` queries per matmul."""
        pool = self._vectors
        best_scores, best_indices = [], []
        for start in range(0, unit_queries.shape[0], QUERY_CHUNK):
            chunk = unit_queries[start : start + QUERY_CHUNK].to(pool.device)
            scores, indices = torch.topk(chunk @ pool.T, k, dim=1, largest=True, sorted=True)
            best_scores.append(scores.cpu())
            best_indices.append(indices.cpu())
        return torch.cat(best_scores), torch.cat(best_indices)

    def _search_faiss(self, unit_queries: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS inner-product search (its scores are the cosine similarities of the unit vectors)."""
        return self._faiss_index.search(_faiss_array(unit_queries), k)

    def save(self, path: Path | str) -> Path:
        """Write the index to directory ``path`` (created if needed); returns the directory."""
        directory = Path(path).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "backend": self.backend,
            "faiss_factory": self.faiss_factory,
            "n_items": len(self),
            "n_features": self._n_features,
            "ids": list(self._ids),
        }
        if self._faiss_index is not None:
            _faiss().write_index(self._faiss_index, str(directory / FAISS_NAME))
        else:
            np.save(directory / VECTORS_NAME, self._vectors.cpu().numpy(), allow_pickle=False)
        (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1))
        return directory

    @classmethod
    def load(cls, path: Path | str) -> "RetrievalIndex":
        """An index written by :meth:`save`, with its saved backend (torch pools load on the CPU)."""
        directory = Path(path).expanduser()
        manifest = _read_manifest(directory / MANIFEST_NAME)
        index = cls.__new__(cls)
        index._ids = _checked_ids(manifest["ids"], n_items=manifest["n_items"])
        index._n_features = manifest["n_features"]
        index.faiss_factory = manifest["faiss_factory"]
        index.backend = manifest["backend"]
        index._vectors, index._faiss_index = None, None
        if index.backend == "faiss":
            index._faiss_index = _read_faiss_index(directory / FAISS_NAME, len(index), index._n_features)
        else:
            index._vectors = _read_vectors(directory / VECTORS_NAME, len(index), index._n_features)
        return index


def _as_matrix(values: Any, name: str, *, allowed_ndims: tuple[int, ...]) -> Tensor:
    """(N, tokens, dim) or (N, features) array/tensor -> (N, features) float32 tensor."""
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(np.ascontiguousarray(values))
    if not isinstance(values, Tensor):
        raise ModelError(f"{name} must be a torch.Tensor or numpy array, got {type(values).__name__}")
    if values.ndim not in allowed_ndims or values.shape[0] < 1 or values[0].numel() < 1:
        raise ModelError(
            f"{name} must have shape (N, tokens, dim) or (N, features) with N >= 1 "
            f"(a single item needs its batch axis), got {tuple(values.shape)}"
        )
    return values.detach().reshape(values.shape[0], -1).to(torch.float32)


def _unit_rows(matrix: Tensor, name: str) -> Tensor:
    """Rows scaled to unit L2 norm; ModelError for rows that are non-finite or all zero."""
    norms = torch.linalg.vector_norm(matrix, dim=1)
    bad = torch.nonzero(~torch.isfinite(norms) | (norms == 0)).flatten().tolist()
    if bad:
        raise ModelError(
            f"{name} rows {bad[:_MAX_LISTED]}{' ...' if len(bad) > _MAX_LISTED else ''} are all zero or "
            "non-finite; cosine similarity needs finite, non-zero vectors"
        )
    return matrix / norms[:, None]


def _checked_ids(ids: Any, *, n_items: int) -> tuple[str, ...]:
    """``ids`` as a tuple of distinct strings, one per item, or a ModelError."""
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise ModelError(f"ids must be a sequence of strings, got {type(ids).__name__}")
    not_str = [value for value in ids if not isinstance(value, str)]
    if not_str:
        raise ModelError(f"ids must be strings, got {not_str[:_MAX_LISTED]!r}")
    duplicates = sorted(value for value, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise ModelError(f"ids must be distinct; repeated: {duplicates[:_MAX_LISTED]}")
    if len(ids) != n_items:
        raise ModelError(f"got {len(ids)} ids for {n_items} embeddings; there must be one id per embedding")
    return tuple(ids)


def _faiss() -> Any:
    """The faiss module (faiss-cpu), imported only when a FAISS backend is used."""
    try:
        import faiss
    except ImportError as error:
        raise ModelError("the FAISS retrieval backend needs the faiss-cpu package (pip install faiss-cpu)") from error
    return faiss


def _faiss_array(unit_rows: Tensor) -> np.ndarray:
    return np.ascontiguousarray(unit_rows.detach().cpu().numpy(), dtype=np.float32)


def _built_faiss_index(unit_rows: Tensor, factory: str) -> Any:
    """``faiss.index_factory(d, factory, METRIC_INNER_PRODUCT)``, trained if it needs it, filled."""
    faiss = _faiss()
    vectors = _faiss_array(unit_rows)
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(vectors)
    except RuntimeError as error:
        raise ModelError(
            f"faiss_factory {factory!r} cannot index {vectors.shape[0]} vectors of {vectors.shape[1]} features: "
            f"{str(error).strip().splitlines()[-1]}"
        ) from error
    index.add(vectors)
    return index


def _read_manifest(path: Path) -> dict[str, Any]:
    """The saved index's ``index.json``, checked for format and field types."""
    if not path.is_file():
        raise ModelError(f"retrieval index manifest {str(path)!r} not found; save() writes it")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"retrieval index manifest {str(path)!r} is not readable JSON: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a retrieval index manifest (format must be {INDEX_FORMAT!r})")
    if manifest.get("version") != INDEX_VERSION:
        raise CheckpointError(f"{str(path)!r}: version {manifest.get('version')!r} is not {INDEX_VERSION}")
    fields = {"backend": str, "faiss_factory": str, "n_items": int, "n_features": int, "ids": list}
    wrong = [name for name, kind in fields.items() if not isinstance(manifest.get(name), kind)]
    if wrong or manifest["backend"] not in ("torch", "faiss"):
        raise CheckpointError(f"{str(path)!r}: fields {wrong or ['backend']} are missing or invalid")
    return manifest


def _read_vectors(path: Path, n_items: int, n_features: int) -> Tensor:
    """The saved unit vectors (no pickle), checked against the manifest."""
    if not path.is_file():
        raise CheckpointError(f"retrieval index vectors {str(path)!r} not found next to its manifest")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"retrieval index vectors {str(path)!r} cannot be read: {error}") from error
    if vectors.shape != (n_items, n_features) or vectors.dtype != np.float32:
        raise CheckpointError(
            f"{str(path)!r} holds {vectors.dtype} {vectors.shape}, the manifest says float32 {(n_items, n_features)}"
        )
    tensor = torch.from_numpy(vectors)
    if not torch.allclose(torch.linalg.vector_norm(tensor, dim=1), torch.ones(n_items), atol=UNIT_NORM_ATOL):
        raise CheckpointError(f"{str(path)!r}: saved vectors must be L2-normalised")
    return tensor


def _read_faiss_index(path: Path, n_items: int, n_features: int) -> Any:
    """The saved FAISS index, checked to be inner-product with the manifest's size."""
    faiss = _faiss()
    if not path.is_file():
        raise CheckpointError(f"retrieval index file {str(path)!r} not found next to its manifest")
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise CheckpointError(f"{str(path)!r} is not a readable FAISS index: {error}") from error
    if (index.ntotal, index.d) != (n_items, n_features) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise CheckpointError(
            f"{str(path)!r} holds {index.ntotal} vectors of {index.d} features (metric {index.metric_type}); "
            f"the manifest says {n_items} of {n_features} with inner product"
        )
    return index
