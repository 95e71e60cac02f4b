"""Image search: embed folders of images once with a retrieval model, then query them by text or image.

An index is a folder:

* ``index.json`` -- the commit point: format version, the model's identity (path and SHA-256 of
  its files), the indexed roots (and which of them are searched recursively), the row count, the names of the current embeddings and manifest
  files, and the files that could not be read (with their size and mtime, so they are retried
  only once they change);
* ``embeddings.<generation>.safetensors`` -- ``(N, D)`` L2-normalised image embeddings, float32;
* ``manifest.<generation>.jsonl`` -- line ``i`` describes row ``i``: path, size, mtime_ns.

A save writes a new generation beside the old one and only then replaces ``index.json``
(``os.replace``), so a crash at any moment leaves the old index or the new one, never a mix.

Embeddings stay float32: both search backends compute in float32 (faiss takes nothing else, and
half-precision matmuls are slow on CPUs), so float16 would only halve the disk file (3 KiB per
image at 768 dimensions) at the price of ~1e-3 score noise and a conversion on every load.

Folders are listed by :func:`beit3.data.files.list_images`, the lister of ``beit3 predict``:
image suffixes only, sub-folders only for a root added with ``recursive``. Re-indexing compares
each file's size and mtime with the manifest: new and changed files are embedded, unchanged ones
kept, vanished ones dropped; a root that no longer exists is dropped from the roots, and said so. A long run commits its progress every
``checkpoint_interval`` seconds and when it stops (even on Ctrl-C), so a rerun resumes.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from beit3.models import Beit3ForImageTextRetrieval
from beit3.models.base import CONFIG_NAME, WEIGHTS_NAME
from beit3.catalogue import spec_for_model
from beit3.data.files import IMAGE_SUFFIXES, InputReport, list_images
from beit3.io import atomic_write, ensure_writable_dir
from beit3.model_folder import load_image_processor, resolve_tokenizer, text_length
from beit3.processing import Beit3ImageProcessor, Beit3Tokenizer
from beit3.processing.image import CONFIG_FILENAME as IMAGE_PROCESSOR_CONFIG
from beit3.processing.image import ImageInput

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
BACKENDS = ("auto", "exact", "faiss")
DEFAULT_FAISS_THRESHOLD = 100_000
EXACT_CHUNK_ROWS = 65_536  # rows scored per matmul: bounds memory at chunk x queries scores
__all__ = ["BACKENDS", "IMAGE_SUFFIXES", "FileRecord", "ImageIndex", "ModelIdentity", "RetrievalEncoder",
           "SearchHit", "SkippedFile", "UpdateReport", "exact_top_k", "faiss_available", "faiss_top_k",
           "fingerprint_model", "write_hits"]


# ---------------------------------------------------------------------------------------------
# Records
@dataclass(frozen=True)
class FileRecord:
    """A file as it was when read: another size or mtime means it changed and is read again."""

    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class SkippedFile:
    """A file that could not be embedded, and why (the reason names the file)."""

    record: FileRecord
    reason: str


@dataclass(frozen=True)
class ModelIdentity:
    """Where a model was and a hash of its files: the hash is what must match, the path is a hint."""

    path: str
    sha256: str


@dataclass(frozen=True)
class SearchHit:
    rank: int
    path: str
    score: float  # cosine similarity


@dataclass
class UpdateReport:
    """What one :meth:`ImageIndex.update` did."""

    added: list[str]
    changed: list[str]
    removed: list[str]
    unchanged: int
    skipped: list[SkippedFile]  # unreadable this run
    skipped_before: int  # unreadable in an earlier run and unchanged since, so not read again
    dropped_roots: list[str] = field(default_factory=list)  # indexed folders that no longer exist


# ---------------------------------------------------------------------------------------------
# The model side
def fingerprint_model(path: str | Path) -> ModelIdentity:
    """SHA-256 of a checkpoint file, or of a model folder's config, weights and image settings."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no model at '{path}': give a retrieval model folder "
                                "(config.json + model.safetensors) or checkpoint file")
    from beit3.export.runtime import exported_sha256

    exported = exported_sha256(path)  # an export folder counts as the model it was exported from
    if exported is not None:
        return ModelIdentity(os.path.abspath(path), exported)
    if path.is_file():
        files = [path]
    else:
        files = [path / name for name in (CONFIG_NAME, WEIGHTS_NAME, IMAGE_PROCESSOR_CONFIG) if (path / name).is_file()]
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return ModelIdentity(os.path.abspath(path), digest.hexdigest())


class RetrievalEncoder:
    """A :class:`Beit3ForImageTextRetrieval` with the preprocessing its embeddings need.

    Args:
        model: a model folder (``config.json`` + ``model.safetensors``, e.g. ``runs/x/final``)
            or a checkpoint file (an official ``*_retrieval.pth``).
        tokenizer: SentencePiece file or tokenizer folder for text queries; default the model
            folder. Loaded on the first text query, so indexing images needs none.
        device: where the model runs (``"auto"``: the GPU when there is one); embeddings always
            come back as float32 on the CPU. A GPU asked for where there is none is a ValueError.
        identity: the model's :func:`fingerprint_model`, when the caller already computed it.
        runtime: ``"onnxruntime"``: ``model`` is an export folder (``beit3 export``) run by onnxruntime.

    Images go through the folder's ``preprocessor_config.json`` (a deterministic pipeline) when it
    has one, else the official retrieval eval pipeline at the model's size.
    """

    def __init__(self, model: str | Path, *, tokenizer: str | Path | None = None,
                 device: str | torch.device = "cpu", identity: ModelIdentity | None = None,
                 runtime: str = "torch") -> None:
        from beit3.pipelines import resolve_device

        device = resolve_device(device)  # before any loading: "cuda" on a CPU machine is one clear error
        path = Path(model)
        self.identity = identity or fingerprint_model(path)
        if path.is_dir():
            config_file = path / CONFIG_NAME
            if not config_file.is_file():
                raise FileNotFoundError(f"'{path}' is not a model folder: {CONFIG_NAME} is missing")
            architecture = json.loads(config_file.read_text()).get("architecture")
            if architecture != Beit3ForImageTextRetrieval.__name__:
                raise ValueError(f"'{path}' holds a {architecture}, not a Beit3ForImageTextRetrieval: "
                                 "search needs a model fine-tuned for image-text retrieval")
        self.device = device
        if runtime == "torch":
            self.model = Beit3ForImageTextRetrieval.from_pretrained(path).to(self.device).eval()
        else:
            from beit3.export.runtime import load_runtime

            self.model = load_runtime(path, runtime, Beit3ForImageTextRetrieval, "search").to(self.device)
        self.image_processor = load_image_processor(path if path.is_dir() else None, spec_for_model(
            Beit3ForImageTextRetrieval).image_mode, self.model.config.image_size)
        self.tokenizer_given, self.model_path = tokenizer, path
        self.max_length = text_length(path)
        self._tokenizer: Beit3Tokenizer | None = None

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def tokenizer(self) -> Beit3Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = resolve_tokenizer(self.tokenizer_given, self.model_path, hint=(
                "text queries need the model's tokenizer: pass --tokenizer (a SentencePiece file such as beit3.spm, "
                "or a tokenizer folder)"))
        return self._tokenizer

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, D)`` unit vectors."""
        return self.model.encode_image(pixel_values.to(self.device)).float().cpu()

    def embed_images(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Image files, PIL images, arrays ... -> ``(B, D)`` unit vectors."""
        return self.embed_pixels(self.image_processor(list(images))["pixel_values"])

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Strings -> ``(B, D)`` unit vectors."""
        batch = self.tokenizer(list(texts), max_length=self.max_length, padding="max_length", truncation=True, return_tensors="pt")
        return self.model.encode_text(batch["input_ids"].to(self.device),
                                      batch["attention_mask"].to(self.device)).float().cpu()


# ---------------------------------------------------------------------------------------------
# Search backends
def exact_top_k(embeddings: torch.Tensor, queries: torch.Tensor, k: int,
                chunk_rows: int = EXACT_CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` inner products of each query against every row: ``(scores, rows)``, each ``(Q, k)``.

    Scores ``chunk_rows`` rows at a time and keeps a running top-k, so memory stays at
    ``Q x chunk_rows`` whatever the collection size.
    """
    k = min(k, embeddings.shape[0])
    best_scores = queries.new_empty(queries.shape[0], 0)
    best_rows = torch.empty(queries.shape[0], 0, dtype=torch.long)
    for start in range(0, embeddings.shape[0], chunk_rows):
        scores = queries @ embeddings[start:start + chunk_rows].t()  # (Q, C)
        top_scores, top_rows = scores.topk(min(k, scores.shape[1]), dim=1)
        merged_scores = torch.cat([best_scores, top_scores], dim=1)
        merged_rows = torch.cat([best_rows, top_rows + start], dim=1)
        best_scores, order = merged_scores.topk(min(k, merged_scores.shape[1]), dim=1)
        best_rows = merged_rows.gather(1, order)
    return best_scores, best_rows


def faiss_top_k(embeddings: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`exact_top_k` with faiss (``IndexFlatIP``); a ValueError says how to install it."""
    try:
        import faiss
    except ImportError:
        raise ValueError("the faiss backend needs the faiss package, which is not installed: "
                         "`pip install faiss-cpu` (or `pip install 'beit3[search]'`), or use the exact "
                         "backend (--backend exact)") from None
    flat = faiss.IndexFlatIP(embeddings.shape[1])
    flat.add(embeddings.contiguous().numpy())
    scores, rows = flat.search(queries.contiguous().numpy(), min(k, embeddings.shape[0]))
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


# ---------------------------------------------------------------------------------------------
# The index
class ImageIndex:
    """Image embeddings of a set of folders, kept on disk, searchable by text or image.

    Args:
        directory: the index folder (created by the first :meth:`update`).
        model: the retrieval model (folder or checkpoint file). Needed to create an index; for an
            existing one it defaults to the model recorded there and, when given, must be the
            same model (same file hash) or a ValueError names both.
        tokenizer: tokenizer for text queries (default: the one recorded at indexing time, else
            the model folder's).
        device: where the model runs.
        runtime: ``"onnxruntime"`` runs ``model``, an export folder, with onnxruntime.

    Example::

        index = ImageIndex("photos.index", model="runs/coco_retrieval/final")
        index.update(["photos/"])
        for hit in index.search_text("a dog on a beach", k=5):
            print(hit.rank, f"{hit.score:.3f}", hit.path)
    """

    def __init__(self, directory: str | Path, *, model: str | Path | None = None,
                 tokenizer: str | Path | None = None, device: str | torch.device = "cpu",
                 runtime: str = "torch") -> None:
        self.directory = Path(directory)
        self.device = device
        self.runtime = runtime
        self._model_path = model
        self._tokenizer_path = os.path.abspath(tokenizer) if tokenizer is not None else None
        self._encoder: RetrievalEncoder | None = None
        self.generation = 0
        self.records: list[FileRecord] = []
        self.roots: list[str] = []
        self.recursive_roots: set[str] = set()  # the roots whose sub-folders are indexed too
        self.skipped: dict[str, SkippedFile] = {}
        self.embeddings = torch.empty(0, 0)
        self.model_identity: ModelIdentity | None = None
        self.recorded_tokenizer: str | None = None
        if (self.directory / INDEX_FILE).is_file():
            self._load()
        elif model is None:
            raise FileNotFoundError(f"no index at '{self.directory}': build it first with "
                                    f"`beit3 search index --model MODEL_DIR --index {self.directory} FOLDER...`")
        if model is not None:
            _ = self.encoder  # load and check the model now, before any work
        if self.model_identity is None:  # a new index
            self.model_identity = self.encoder.identity
            self.embeddings = torch.empty(0, self.encoder.dim)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def encoder(self) -> RetrievalEncoder:
        """The model, loaded on first use and checked against the one the index was built with."""
        if self._encoder is None:
            path = self._model_path
            if path is None:  # an existing index and no model given: the recorded one
                path = self.model_identity.path
                if not Path(path).exists():
                    raise FileNotFoundError(
                        f"index '{self.directory}' was built with model '{path}', which is gone: pass "
                        f"--model with a copy of it (sha256 {self.model_identity.sha256[:16]})")
            identity = fingerprint_model(path)
            if self.model_identity is not None and identity.sha256 != self.model_identity.sha256:
                raise ValueError(self._mismatch_message(identity))
            tokenizer = self._tokenizer_path or self.recorded_tokenizer
            self._encoder = RetrievalEncoder(path, tokenizer=tokenizer, device=self.device, identity=identity,
                                             runtime=self.runtime)
        return self._encoder

    def _mismatch_message(self, given: ModelIdentity) -> str:
        built = self.model_identity
        if given.path == built.path:
            what = f"the model at '{built.path}' has changed since (sha256 {built.sha256[:16]} then, {given.sha256[:16]} now)"
        else:
            what = (f"it was built with model '{built.path}' (sha256 {built.sha256[:16]}), not with "
                    f"'{given.path}' (sha256 {given.sha256[:16]})")
        return (f"index '{self.directory}' does not match the model: {what}. Embeddings of different models "
                f"cannot be compared: query with the model the index was built with, or build a separate "
                f"index with `beit3 search index --model {given.path} --index NEW_INDEX_DIR FOLDER...`")

    # ------------------------------------------------------------------------------- indexing
    def update(self, paths: Iterable[str | Path] = (), *, batch_size: int = 32, num_workers: int = 0,
               progress: bool = True, checkpoint_interval: float = 600.0, recursive: bool = False) -> UpdateReport:
        """Add ``paths`` (folders or image files) to the index's roots and bring the index up to date
        with every root: embed new and changed images, drop vanished ones. Unreadable files are
        reported on stderr, one line each, and left out.

        Folders give their image files (by suffix); their sub-folders too when ``recursive``, which
        is remembered for each root given, so a later refresh lists it the same way. A root that
        no longer exists is reported, dropped from the roots and its images from the index.

        Progress is committed every ``checkpoint_interval`` seconds and at the end, even when the
        run is interrupted, so a rerun picks up where this one stopped.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        new_roots = [os.path.abspath(p) for p in paths]
        for root in new_roots:
            if not os.path.exists(root):
                raise FileNotFoundError(f"no such image file or folder: '{root}'")
        roots = list(dict.fromkeys(self.roots + new_roots))
        if not roots:
            raise ValueError(f"nothing to index: give image folders, e.g. `beit3 search index --index "
                             f"{self.directory} photos/`")
        ensure_writable_dir(self.directory, what="index folder")  # before any embedding
        dropped_roots = [root for root in roots if not os.path.exists(root)]
        for root in dropped_roots:
            inside = sum(1 for r in self.records if r.path == root or r.path.startswith(root.rstrip(os.sep) + os.sep))
            _report(f"warning: indexed folder '{root}' no longer exists: its {inside} images are dropped and it is "
                    "removed from the index's folders (give it again to index it anew)")
        roots = [root for root in roots if root not in dropped_roots]
        recursive_roots = {r for r in self.recursive_roots if r not in new_roots} | (set(new_roots) if recursive else set())
        recursive_roots &= set(roots)
        listing = _list_image_files(roots, recursive_roots)

        stored = {record.path: record for record in self.records}
        todo: list[FileRecord] = []
        added, changed, unchanged, skipped_before = [], [], 0, 0
        for path, record in listing.items():
            if stored.get(path) == record:
                unchanged += 1
            elif path in self.skipped and self.skipped[path].record == record:
                skipped_before += 1
            else:
                todo.append(record)
                (changed if path in stored else added).append(path)
        removed = [path for path in stored if path not in listing]

        old_records, old_embeddings, old_skipped = self.records, self.embeddings, self.skipped
        done: list[FileRecord] = []
        done_embeddings: list[torch.Tensor] = []
        skipped_now: dict[str, SkippedFile] = {}

        def commit() -> None:
            # Rows not re-read yet keep their old embedding and old mtime, so a later run redoes them.
            replaced = {record.path for record in done} | set(skipped_now)
            keep = [i for i, r in enumerate(old_records) if r.path in listing and r.path not in replaced]
            skipped = {p: s for p, s in old_skipped.items() if p in listing and p not in replaced}
            self._save(records=[old_records[i] for i in keep] + done,
                       embeddings=torch.cat([old_embeddings[keep], *done_embeddings]),
                       roots=roots, recursive_roots=recursive_roots, skipped={**skipped, **skipped_now})

        stale = (removed or roots != self.roots or recursive_roots != self.recursive_roots
                 or set(self.skipped) - set(listing))
        if not todo:
            if stale or not (self.directory / INDEX_FILE).is_file():
                commit()
            return UpdateReport(added, changed, removed, unchanged, [], skipped_before, dropped_roots)

        encoder = self.encoder
        loader = DataLoader(_ImageFiles([r.path for r in todo], encoder.image_processor),
                            batch_size=batch_size, num_workers=num_workers, collate_fn=list)
        bar = tqdm(total=len(todo), unit="img", desc="embedding", file=sys.stderr,
                   disable=None if progress else True)  # None: off when stderr is not a terminal
        last_commit = time.monotonic()
        try:
            for batch in loader:
                readable = []
                for position, pixels, reason in batch:
                    if reason is None:
                        readable.append((position, pixels))
                    else:
                        skipped_now[todo[position].path] = SkippedFile(todo[position], reason)
                        _report(f"skipped: {reason}")
                if readable:
                    done_embeddings.append(encoder.embed_pixels(torch.stack([p for _, p in readable])))
                    done += [todo[position] for position, _ in readable]
                bar.update(len(batch))
                if time.monotonic() - last_commit >= checkpoint_interval:
                    commit()
                    last_commit = time.monotonic()
        finally:
            bar.close()
            commit()
        return UpdateReport([p for p in added if p not in skipped_now], [p for p in changed if p not in skipped_now],
                            removed, unchanged, list(skipped_now.values()), skipped_before, dropped_roots)

    # ------------------------------------------------------------------------------- searching
    def search(self, queries: torch.Tensor, k: int = 5, *, backend: str = "auto",
               faiss_threshold: int = DEFAULT_FAISS_THRESHOLD) -> list[list[SearchHit]]:
        """Top-``k`` images by cosine similarity for each row of ``queries`` ``(Q, D)`` (unit vectors).

        ``backend``: ``"exact"`` (chunked matmul), ``"faiss"`` (``IndexFlatIP``; an error when faiss
        is not installed) or ``"auto"``: faiss when it is installed and the index holds at least
        ``faiss_threshold`` images, exact otherwise. Both give the same ranking up to float error.
        """
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {list(BACKENDS)}")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if not self.records:
            raise ValueError(f"index '{self.directory}' holds no images: add some with "
                             f"`beit3 search index --index {self.directory} FOLDER...`")
        queries = queries.float().cpu().reshape(-1, self.embeddings.shape[1])
        use_faiss = backend == "faiss" or (
            backend == "auto" and len(self) >= faiss_threshold and faiss_available())
        scores, rows = (faiss_top_k if use_faiss else exact_top_k)(self.embeddings, queries, k)
        return [[SearchHit(rank + 1, self.records[row].path, score)
                 for rank, (score, row) in enumerate(zip(query_scores.tolist(), query_rows.tolist()))]
                for query_scores, query_rows in zip(scores, rows)]

    def search_text(self, text: str, k: int = 5, **options: Any) -> list[SearchHit]:
        """The ``k`` images closest to ``text``; ``options`` as in :meth:`search`."""
        return self.search(self.encoder.embed_texts([text]), k, **options)[0]

    def search_image(self, image: ImageInput, k: int = 5, **options: Any) -> list[SearchHit]:
        """The ``k`` images closest to ``image`` (a path, PIL image, array ...)."""
        return self.search(self.encoder.embed_images([image]), k, **options)[0]

    # ------------------------------------------------------------------------------- storage
    def _load(self) -> None:
        meta_file = self.directory / INDEX_FILE
        where = str(meta_file)  # the file (and line) a damage is in, for the message
        try:
            meta = _read_json(meta_file)
            if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
                version = meta.get("format_version") if isinstance(meta, dict) else None
                raise ValueError(f"format version {version}, this beit3 reads {FORMAT_VERSION}")
            where = str(self.directory / meta["manifest"])
            records = _read_manifest(self.directory / meta["manifest"])
            where = str(self.directory / meta["embeddings"])
            try:
                embeddings = load_file(self.directory / meta["embeddings"])["embeddings"]
            except OSError:
                raise
            except Exception as err:  # safetensors raises its own error type for a damaged file
                raise ValueError(f"not a safetensors file of embeddings ({err})") from None
            where = str(meta_file)
            if not len(records) == embeddings.shape[0] == meta["count"]:
                raise ValueError(f"{len(records)} manifest lines, {embeddings.shape[0]} embeddings, "
                                 f"count {meta['count']}")
            self.model_identity = ModelIdentity(**meta["model"])
            self.skipped = {s["path"]: SkippedFile(FileRecord(s["path"], s["size"], s["mtime_ns"]), s["reason"])
                            for s in meta["skipped"]}
            self.generation, self.recorded_tokenizer, self.roots = meta["generation"], meta["tokenizer"], meta["roots"]
            # Indexes written before sub-folders became opt-in listed every root recursively.
            self.recursive_roots = set(meta.get("recursive_roots", self.roots))
        except _Damage as err:
            raise ValueError(f"{err}: index '{self.directory}' is damaged; delete the folder and build it again "
                             "with `beit3 search index`") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            what = f"missing field {err}" if isinstance(err, KeyError) else (
                err.strerror or str(err) if isinstance(err, OSError) else str(err))
            raise ValueError(f"{where}: {what}: index '{self.directory}' is damaged; delete the folder and build "
                             "it again with `beit3 search index`") from None
        self.records, self.embeddings = records, embeddings

    def _save(self, *, records: list[FileRecord], embeddings: torch.Tensor, roots: list[str],
              recursive_roots: set[str], skipped: dict[str, SkippedFile]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        generation = self.generation + 1
        embeddings_name = f"embeddings.{generation}.safetensors"
        manifest_name = f"manifest.{generation}.jsonl"
        embeddings = embeddings.contiguous()
        tokenizer = self._tokenizer_path or self.recorded_tokenizer
        meta = {
            "format_version": FORMAT_VERSION,
            "model": asdict(self.model_identity),
            "tokenizer": tokenizer,
            "roots": roots,
            "recursive_roots": sorted(recursive_roots),
            "count": len(records),
            "embedding_dim": embeddings.shape[1],
            "dtype": "float32",
            "generation": generation,
            "embeddings": embeddings_name,
            "manifest": manifest_name,
            "skipped": [{**asdict(s.record), "reason": s.reason} for s in skipped.values()],
        }
        manifest = "".join(json.dumps(asdict(r)) + "\n" for r in records)
        try:
            atomic_write(self.directory / embeddings_name, lambda tmp: _write_embeddings(embeddings, tmp, target=self.directory / embeddings_name))
            atomic_write(self.directory / manifest_name, lambda tmp: _write_text(tmp, manifest, target=self.directory / manifest_name))
            atomic_write(self.directory / INDEX_FILE, lambda tmp: _write_text(tmp, json.dumps(meta, indent=2) + "\n",
                                                                          target=self.directory / INDEX_FILE))
        except BaseException:
            # index.json still names the previous generation: this one's files go, so a failed
            # save (a full disk, Ctrl-C) leaves the folder exactly as it was.
            for name in (embeddings_name, manifest_name):
                (self.directory / name).unlink(missing_ok=True)
            raise
        # index.json now names this generation; older ones (and leftovers of a crashed save) go.
        for pattern in ("embeddings.*.safetensors", "manifest.*.jsonl"):
            for old in self.directory.glob(pattern):
                if old.name not in (embeddings_name, manifest_name):
                    old.unlink(missing_ok=True)
        self.generation, self.records, self.embeddings = generation, records, embeddings
        self.roots, self.skipped, self.recorded_tokenizer = roots, skipped, tokenizer
        self.recursive_roots = set(recursive_roots)


class _Damage(ValueError):
    """A damaged index file; the message starts with the file and line."""


def _read_json(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _Damage(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None


def _read_manifest(path: Path) -> list[FileRecord]:
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
            records.append(FileRecord(path=str(row["path"]), size=int(row["size"]), mtime_ns=int(row["mtime_ns"])))
        except json.JSONDecodeError as err:
            raise _Damage(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        except (KeyError, TypeError, ValueError) as err:
            what = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise _Damage(f"{path}:{number}: not a manifest record ({what}); expected "
                          '{"path": ..., "size": ..., "mtime_ns": ...}') from None
    return records


def _default_file_mode() -> int:
    """The mode a new file gets from ``open()``: 0o666 less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _named(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` with the file's name when the failing call gave none (a failed write() or close())."""
    if err.filename is not None:
        return err
    named = OSError(err.errno, err.strerror, str(path))
    named.__cause__ = err
    return named


def _write_text(tmp: str, text: str, target: Path) -> None:
    try:
        Path(tmp).write_text(text, encoding="utf-8")
    except OSError as err:
        raise _named(err, target)


def _write_embeddings(embeddings: torch.Tensor, tmp: str, target: Path) -> None:
    """safetensors, with the default permissions (safetensors creates its files owner-only, 0600)
    and an ``OSError`` naming the file when writing fails (safetensors raises its own error type,
    which the command line would print as a traceback)."""
    try:
        save_file({"embeddings": embeddings}, tmp)
    except OSError as err:
        raise _named(err, target)
    except Exception as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(target)) from err
    os.chmod(tmp, _default_file_mode())


def _report(line: str) -> None:
    tqdm.write(line, file=sys.stderr)  # above any progress bar, not through it


def _list_image_files(roots: Sequence[str], recursive_roots: set[str]) -> dict[str, FileRecord]:
    """The image files of ``roots`` by path, listed by :func:`beit3.data.files.list_images` (a root
    that is a file is taken whatever its suffix; the sub-folders of ``recursive_roots`` are entered)."""
    report = InputReport()
    paths = list_images([r for r in roots if r not in recursive_roots], report)
    paths += list_images([r for r in roots if r in recursive_roots], report, recursive=True)
    found = {}
    for path in sorted({str(p) for p in paths}):
        try:
            stat = os.stat(path)
        except OSError:
            continue  # vanished while listing
        found[path] = FileRecord(path, stat.st_size, stat.st_mtime_ns)
    return found


class _ImageFiles(Dataset):
    """Image files -> ``(position, pixels, None)``, or ``(position, None, reason)`` when unreadable."""

    def __init__(self, paths: list[str], processor: Beit3ImageProcessor) -> None:
        self.paths = paths
        self.processor = processor

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, position: int) -> tuple[int, torch.Tensor | None, str | None]:
        path = self.paths[position]
        try:
            return position, self.processor.preprocess(path), None
        except Exception as err:  # decoders raise many types on malformed files; one must not stop a run
            reason = str(err) if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {err}"
            if path not in reason:
                reason = f"cannot read image '{path}': {reason}"
            return position, None, reason


def write_hits(path: Path, queries: Sequence[tuple[str, str]], hits: Sequence[Sequence[SearchHit]]) -> None:
    """JSON: one object per query with its hits; CSV: one row per hit (kind, query, rank, score, path).
    Written atomically: a failure leaves the previous file, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".json":
        records = [{"kind": kind, "query": query, "hits": [asdict(hit) for hit in query_hits]}
                   for (kind, query), query_hits in zip(queries, hits)]
        text = json.dumps(records, indent=2) + "\n"
        atomic_write(path, lambda tmp: _write_text(tmp, text, target=path))
        return

    def write_csv(tmp: str) -> None:
        try:
            with open(tmp, "w", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                writer.writerow(["kind", "query", "rank", "score", "path"])
                for (kind, query), query_hits in zip(queries, hits):
                    writer.writerows([kind, query, hit.rank, f"{hit.score:.6f}", hit.path] for hit in query_hits)
        except OSError as err:
            raise _named(err, path)

    atomic_write(path, write_csv)
