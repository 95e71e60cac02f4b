"""The ``beit3 serve`` application: FastAPI endpoints over the task pipelines and an image index.

:class:`Server` loads the models (each folder's task read from its ``config.json``), one
:class:`~beit3.serve.batching.DynamicBatcher` per model, and the index; :func:`create_app` wraps
it in a FastAPI app with the upload limit, the API key check and the request metrics.
docs/serve.md describes the endpoints.
"""

import hmac
import io
import ipaddress
import mimetypes
import os
import threading
import time
from collections import Counter, OrderedDict, defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from beit3.serve.batching import DynamicBatcher, QueueFull, RequestTimeout

STATIC = Path(__file__).parent / "static"

SERVED_VERBS = ("caption", "vqa", "classify", "nlvr2", "zero-shot")
"""The ``beit3 predict`` verbs (catalogue ``TaskSpec.verb``) that have an endpoint ``POST /<verb>``.
A retrieval model also serves ``/search`` when it is the model of ``--index``."""


def endpoints() -> dict[str, str]:
    """Catalogue task -> its endpoint, for the tasks whose verb is served."""
    from beit3.catalogue import iter_tasks

    return {spec.name: spec.verb for spec in iter_tasks("finetune", having="verb") if spec.verb in SERVED_VERBS}


def task_words(endpoint: str) -> str:
    """What kind of model an endpoint needs, in words (the task's name and description)."""
    from beit3.catalogue import get_task

    spec = get_task(endpoint)
    return spec.description.split(":")[0] if spec.description else spec.name


PUBLIC_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico")
"""Paths answered without the API key: the page (which asks for the key), health and the API docs."""
THUMBNAIL_CACHE = 512
MAX_TOP_K = 100


@dataclass
class ServeConfig:
    """What ``beit3 serve`` was asked for (its command-line options)."""

    models: Sequence[str | os.PathLike] = ()
    index: str | os.PathLike | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_batch: int = 8
    max_wait_ms: float = 10.0
    queue_size: int = 64
    timeout_s: float = 30.0
    max_upload_mb: float = 10.0
    max_pixels: int = 40_000_000
    device: str = "auto"
    classes: Sequence[str] = field(default_factory=tuple)


class BadInput(ValueError):
    """An upload or field the server cannot use: answered with ``status`` and the message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) can be reached only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------- images
def decode_upload(data: bytes, what: str, max_pixels: int):
    """Upload bytes -> an RGB PIL image, or :class:`BadInput` saying what is wrong with them."""
    from PIL import Image, UnidentifiedImageError

    from beit3.processing.image import load_image

    if not data:
        raise BadInput(f"{what}: the upload is empty (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except Image.DecompressionBombError as err:  # PIL's own limit, twice Image.MAX_IMAGE_PIXELS
        raise BadInput(f"{what}: {err}; send a smaller image", status=413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise BadInput(f"{what}: not an image this server can decode (send a JPEG, PNG, WebP, GIF, BMP ...)") from None
    if width * height > max_pixels:
        raise BadInput(f"{what}: the image is {width}x{height} ({width * height / 1e6:.0f} M pixels), more than the "
                       f"{max_pixels / 1e6:.0f} M pixels this server decodes (a decompression bomb?); send a smaller "
                       "image", status=413)
    try:
        return load_image(data)
    except (ValueError, OSError) as err:
        raise BadInput(f"{what}: {str(err).replace('<bytes>', 'the upload')}") from None


def _top_k(value: int) -> int:
    if not 1 <= value <= MAX_TOP_K:
        raise BadInput(f"top_k must be between 1 and {MAX_TOP_K}, got {value}")
    return value


# ---------------------------------------------------------------------------------------- metrics
class Metrics:
    """Requests per endpoint and status, latency percentiles over the last 2048 requests of each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, Counter] = defaultdict(Counter)
        self.latency: dict[str, deque] = defaultdict(lambda: deque(maxlen=2048))

    def record(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint][str(status)] += 1
            self.latency[endpoint].append(seconds)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            out = {}
            for endpoint, statuses in sorted(self.requests.items()):
                samples = sorted(self.latency[endpoint])
                out[endpoint] = {"requests": sum(statuses.values()), "by_status": dict(statuses),
                                 "latency_ms": {"p50": _percentile(samples, 50) * 1000,
                                                "p99": _percentile(samples, 99) * 1000}}
            return out


def _percentile(sorted_samples: list[float], q: float) -> float:
    if not sorted_samples:
        return 0.0
    rank = min(len(sorted_samples) - 1, max(0, int(round(q / 100 * len(sorted_samples) + 0.5)) - 1))
    return sorted_samples[rank]


# ---------------------------------------------------------------------------------------- the server
class Server:
    """The loaded models, their batchers and the index; what the endpoints call."""

    def __init__(self, config: ServeConfig) -> None:
        from beit3.catalogue import get_task
        from beit3.model_folder import model_architecture, model_kind
        from beit3.pipelines import pipeline, resolve_device

        self.config = config
        self.device = resolve_device(config.device)
        self.pipelines: dict[str, Any] = {}  # endpoint -> pipeline
        self.model_dirs: dict[str, str] = {}
        for folder in config.models:
            folder = Path(folder)
            if not (folder / "config.json").is_file():
                raise FileNotFoundError(f"--model {folder}: not a model folder (no config.json)")
            architecture = model_architecture(folder)
            kind, spec = model_kind(architecture)
            served_tasks = endpoints()
            if spec is None or spec.name not in served_tasks:
                served = ", ".join(sorted(served_tasks))
                raise ValueError(f"--model {folder} is {kind} ({architecture}); beit3 serve serves {served} models")
            endpoint = served_tasks[spec.name]
            if endpoint in self.pipelines:
                raise ValueError(f"two {spec.name} models given ({self.model_dirs[endpoint]} and {folder}); "
                                 "serve one model per task")
            self.pipelines[endpoint] = pipeline(get_task(spec.name).name, folder, device=self.device,
                                                batch_size=config.max_batch)
            self.model_dirs[endpoint] = str(folder)
        self.index = None
        self.index_roots: list[str] = []
        if config.index is not None:
            self._open_index(Path(config.index))
        if not self.pipelines and self.index is None:
            raise ValueError("nothing to serve: give --model DIR (a fine-tuned model folder) and/or --index DIR")
        self._zero_shot_classes: OrderedDict[tuple[str, ...], Any] = OrderedDict()
        runners = {"caption": self._caption, "vqa": self._vqa, "classify": self._classify, "nlvr2": self._nlvr2,
                   "zero-shot": self._zero_shot}
        self.batchers: dict[str, DynamicBatcher] = {
            endpoint: self._batcher(endpoint, runners[endpoint]) for endpoint in self.pipelines}
        if self.index is not None:
            self.batchers["search"] = self._batcher("search", self._search)
        self.metrics = Metrics()
        self._thumbnails: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._thumbnail_lock = threading.Lock()

    def _batcher(self, name: str, fn) -> DynamicBatcher:
        c = self.config
        return DynamicBatcher(fn, name=name, max_batch=c.max_batch, max_wait_ms=c.max_wait_ms,
                              queue_size=c.queue_size, timeout_s=c.timeout_s)

    def _open_index(self, directory: Path) -> None:
        from beit3.tasks.search import INDEX_FILE, ImageIndex, fingerprint_model

        if not (directory / INDEX_FILE).is_file():
            raise FileNotFoundError(f"--index {directory}: no index there (build one with `beit3 search index`)")
        model = None
        if "zero-shot" in self.model_dirs:  # the retrieval model given may be the index's, at another path
            index_probe = ImageIndex(directory)
            if fingerprint_model(self.model_dirs["zero-shot"]).sha256 == index_probe.model_identity.sha256:
                model = self.model_dirs["zero-shot"]
        self.index = ImageIndex(directory, model=model, device=self.device)
        _ = self.index.encoder  # load the model now: a missing one fails at start, not at the first query
        self.index_roots = [os.path.realpath(root) for root in self.index.roots]
        self._row_of = {record.path: row for row, record in enumerate(self.index.records)}

    def close(self) -> None:
        for batcher in self.batchers.values():
            batcher.close()

    # ------------------------------------------------------------------------- the batch runners
    def _caption(self, items: list[Any]) -> list[dict[str, Any]]:
        return self.pipelines["caption"](list(items))

    def _vqa(self, items: list[tuple[Any, str, int]]) -> list[list[dict[str, Any]]]:
        images, questions, ks = zip(*items)
        answers = self.pipelines["vqa"](list(images), list(questions), top_k=max(ks))
        return [row[:k] for row, k in zip(answers, ks)]

    def _classify(self, items: list[tuple[Any, int]]) -> list[list[dict[str, Any]]]:
        images, ks = zip(*items)
        labels = self.pipelines["classify"](list(images), top_k=max(ks))
        return [row[:k] for row, k in zip(labels, ks)]

    def _nlvr2(self, items: list[tuple[Any, Any, str]]) -> list[dict[str, Any]]:
        lefts, rights, statements = zip(*items)
        return self.pipelines["nlvr2"](list(zip(lefts, rights)), list(statements))

    def _zero_shot(self, items: list[tuple[Any, tuple[str, ...], int]]) -> list[list[dict[str, Any]]]:
        zero_shot = self.pipelines["zero-shot"]
        results: list[Any] = [None] * len(items)
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for position, (_, classes, _) in enumerate(items):
            groups[classes].append(position)
        for classes, positions in groups.items():  # one image-tower call per set of classes
            if classes not in self._zero_shot_classes:
                zero_shot.set_classes(list(classes))
                self._zero_shot_classes[classes] = (zero_shot.classes, zero_shot.class_embeds)
                while len(self._zero_shot_classes) > 32:
                    self._zero_shot_classes.popitem(last=False)
            self._zero_shot_classes.move_to_end(classes)
            zero_shot.classes, zero_shot.class_embeds = self._zero_shot_classes[classes]
            k = max(items[p][2] for p in positions)
            scores = zero_shot([items[p][0] for p in positions], top_k=k)
            for p, row in zip(positions, scores):
                results[p] = row[:items[p][2]]
        return results

    def _search(self, items: list[tuple[str, Any, int]]) -> list[list[dict[str, Any]]]:
        import torch

        encoder = self.index.encoder
        texts = [p for p, (kind, _, _) in enumerate(items) if kind == "text"]
        images = [p for p, (kind, _, _) in enumerate(items) if kind == "image"]
        parts, order = [], texts + images
        if texts:
            parts.append(encoder.embed_texts([items[p][1] for p in texts]))
        if images:
            parts.append(encoder.embed_images([items[p][1] for p in images]))
        hits = self.index.search(torch.cat(parts), max(k for _, _, k in items), backend="exact")
        results: list[Any] = [None] * len(items)
        for p, query_hits in zip(order, hits):
            results[p] = [self.describe_hit(hit) for hit in query_hits[:items[p][2]]]
        return results

    def describe_hit(self, hit) -> dict[str, Any]:
        row = self._row_of[hit.path]
        return {"rank": hit.rank, "score": hit.score, "id": row, "name": self._display_name(hit.path),
                "image_url": f"/image/{row}", "thumbnail_url": f"/thumbnail/{row}"}

    def _display_name(self, path: str) -> str:
        """The file's path inside its indexed folder (never where that folder is on the server)."""
        for root in self.index.roots:
            if path.startswith(root.rstrip(os.sep) + os.sep):
                return os.path.relpath(path, root)
        return os.path.basename(path)

    # ------------------------------------------------------------------------- index files
    def indexed_file(self, image_id: str) -> Path:
        """The file of index row ``image_id`` (digits only), checked to lie inside an indexed folder
        once symlinks are resolved; :class:`BadInput` (404 / 403) otherwise."""
        if self.index is None:
            raise BadInput("no image index loaded: start the server with --index INDEX_DIR", 404)
        if not image_id.isdigit() or int(image_id) >= len(self.index.records):
            raise BadInput(f"no image with id {image_id!r}: ids are the numbers 0..{len(self.index) - 1} "
                           "that /search returns", 404)
        path = self.index.records[int(image_id)].path
        real = os.path.realpath(path)
        inside = any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.index_roots)
        if not inside:
            raise BadInput(f"image {image_id} resolves to a file outside the indexed folders; it is not served", 403)
        if not os.path.isfile(real):
            raise BadInput(f"image {image_id} is no longer on disk (re-index with `beit3 search index`)", 404)
        return Path(real)

    def thumbnail(self, image_id: str, size: int) -> bytes:
        from beit3.processing.image import load_image

        path = self.indexed_file(image_id)
        key = (int(image_id), size, path.stat().st_mtime_ns)
        with self._thumbnail_lock:
            if key in self._thumbnails:
                self._thumbnails.move_to_end(key)
                return self._thumbnails[key]
        try:
            image = load_image(path)
        except (ValueError, OSError) as err:
            raise BadInput(f"image {image_id} cannot be read: {err}", 422) from None
        image.thumbnail((size, size))
        out = io.BytesIO()
        image.save(out, "JPEG", quality=85)
        data = out.getvalue()
        with self._thumbnail_lock:
            self._thumbnails[key] = data
            while len(self._thumbnails) > THUMBNAIL_CACHE:
                self._thumbnails.popitem(last=False)
        return data

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "device": str(self.device),
                "tasks": {endpoint: self.model_dirs[endpoint] for endpoint in self.pipelines},
                "index": None if self.index is None else {"images": len(self.index)},
                "auth": bool(self.config.api_key)}

    def metrics_snapshot(self) -> dict[str, Any]:
        return {"endpoints": self.metrics.snapshot(),
                "models": {name: {"calls": b.calls, "queue_length": b.queue_length, "max_batch": b.max_batch,
                                  "batch_sizes": {str(k): v for k, v in sorted(b.batch_sizes.items())}}
                           for name, b in self.batchers.items()}}


def missing_model(endpoint: str) -> str:
    return (f"no {task_words(endpoint)} model is loaded: start the server with --model DIR, a fine-tuned "
            f"{task_words(endpoint)} model folder, to serve /{endpoint}")


# ---------------------------------------------------------------------------------------- middleware
class _TooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413 (by its Content-Length
    before anything is read, else as soon as the bytes received pass the limit)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        megabytes = f"{self.limit / 2**20:.2f}".rstrip("0").rstrip(".")
        message = f"the upload is larger than this server's limit of {megabytes} MB (beit3 serve --max-upload-mb)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _json(send, 413, {"detail": message})
        received, started, refused = 0, False, False

        async def counting_receive():
            # Past the limit, 413 is sent at once and whatever the app answers later is dropped
            # (FastAPI turns any error raised while it reads a body into its own 400).
            nonlocal received, refused
            event = await receive()
            if event["type"] == "http.request":
                received += len(event.get("body", b""))
                if received > self.limit and not refused:
                    refused = True
                    if not started:
                        await _json(send, 413, {"detail": message})
                    raise _TooLarge
            return event

        async def guarded_send(event):
            nonlocal started
            if refused:
                return
            started = started or event["type"] == "http.response.start"
            await send(event)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _TooLarge:
            pass


async def _json(send, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def _api_key_of(headers) -> str | None:
    key = headers.get("x-api-key")
    if key:
        return key
    authorization = headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


# ---------------------------------------------------------------------------------------- the app
def create_app(server: Server):
    """The FastAPI app over ``server`` (its batchers are closed when the app shuts down)."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, File, Form, Query, Request, UploadFile
    from fastapi.responses import FileResponse, JSONResponse, Response
    from fastapi.staticfiles import StaticFiles
    from starlette.concurrency import run_in_threadpool

    config = server.config

    @asynccontextmanager
    async def lifespan(app):
        yield
        server.close()

    app = FastAPI(title="beit3 serve", version="1", lifespan=lifespan,
                  description="BEiT-3 models over HTTP: captions, answers, class scores, visual reasoning, "
                  "zero-shot labels and image search. See docs/serve.md.")
    app.state.server = server

    @app.middleware("http")
    async def auth_and_metrics(request: Request, call_next):
        start = time.perf_counter()
        path = request.url.path
        if config.api_key and path not in PUBLIC_PATHS and not path.startswith("/static/"):
            given = _api_key_of(request.headers)
            if given is None or not hmac.compare_digest(given.encode(), config.api_key.encode()):
                response = JSONResponse({"detail": "missing or wrong API key: send the header 'X-API-Key: KEY' or "
                                         "'Authorization: Bearer KEY'"}, status_code=401,
                                        headers={"WWW-Authenticate": "Bearer"})
                server.metrics.record("(no API key)", 401, time.perf_counter() - start)
                return response
        response = await call_next(request)
        server.metrics.record(_route_of(request), response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, err: BadInput):
        return JSONResponse({"detail": str(err)}, status_code=err.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": str(err.retry_after)})

    @app.exception_handler(RequestTimeout)
    async def timed_out(request: Request, err: RequestTimeout):
        return JSONResponse({"detail": str(err)}, status_code=504)

    async def image_of(upload: UploadFile, what: str):
        data = await upload.read()
        return await run_in_threadpool(decode_upload, data, what, config.max_pixels)

    async def ask(endpoint: str, item: Any) -> Any:
        batcher = server.batchers.get(endpoint)
        if batcher is None:
            raise BadInput(missing_model(endpoint), 404)
        try:
            return await batcher.run(item)
        except ValueError as err:  # the pipeline refused the input (an empty question ...)
            raise BadInput(str(err)) from None

    def need(endpoint: str) -> None:
        if endpoint not in server.batchers:
            raise BadInput(missing_model(endpoint) if endpoint != "search" else
                           "no image index loaded: start the server with --index INDEX_DIR "
                           "(built by `beit3 search index`)", 404)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health", summary="Which models and index are loaded")
    async def health():
        return server.health()

    @app.get("/metrics", summary="Requests, latency percentiles, batch sizes and queue lengths")
    async def metrics():
        return server.metrics_snapshot()

    @app.post("/caption", summary="Caption an image")
    async def caption(image: UploadFile = File(..., description="the image")):
        need("caption")
        return await ask("caption", await image_of(image, "image"))

    @app.post("/vqa", summary="Answer a question about an image")
    async def vqa(image: UploadFile = File(...), question: str = Form(..., description="the question"),
                  top_k: int = Form(5)):
        need("vqa")
        if not question.strip():
            raise BadInput("question is empty; ask something (e.g. 'what colour is the car?')")
        item = (await image_of(image, "image"), question, _top_k(top_k))
        return {"question": question, "answers": await ask("vqa", item)}

    @app.post("/classify", summary="Score an image's classes")
    async def classify(image: UploadFile = File(...), top_k: int = Form(5)):
        need("classify")
        item = (await image_of(image, "image"), _top_k(top_k))
        return {"labels": await ask("classify", item)}

    @app.post("/nlvr2", summary="Is a statement true of a pair of images?")
    async def nlvr2(left: UploadFile = File(...), right: UploadFile = File(...), statement: str = Form(...)):
        need("nlvr2")
        if not statement.strip():
            raise BadInput("statement is empty; give the sentence to judge")
        item = (await image_of(left, "left"), await image_of(right, "right"), statement)
        return await ask("nlvr2", item)

    @app.post("/zero-shot", summary="Pick an image's class among names given")
    async def zero_shot(image: UploadFile = File(...),
                        classes: str = Form(..., description="class names, comma-separated"), top_k: int = Form(5)):
        need("zero-shot")
        names = tuple(dict.fromkeys(name.strip() for name in classes.split(",") if name.strip()))
        if not names:
            raise BadInput("classes is empty: give class names separated by commas, e.g. 'cat, dog, car'")
        if len(names) > 1000:
            raise BadInput(f"{len(names)} classes given; at most 1000")
        item = (await image_of(image, "image"), names, _top_k(top_k))
        return {"labels": await ask("zero-shot", item)}

    @app.get("/search", summary="Search the indexed images by text")
    async def search_text(q: str = Query(..., description="the text query"), k: int = Query(8)):
        need("search")
        if not q.strip():
            raise BadInput("q is empty: give the text to search for, e.g. /search?q=a+red+car")
        return {"query": q, "hits": await ask("search", ("text", q, _top_k(k)))}

    @app.post("/search", summary="Search the indexed images by an image (or a text field)")
    async def search_post(image: UploadFile | None = File(None), q: str | None = Form(None), k: int = Form(8)):
        need("search")
        if image is not None:
            item = ("image", await image_of(image, "image"), _top_k(k))
        elif q and q.strip():
            item = ("text", q, _top_k(k))
        else:
            raise BadInput("nothing to search for: upload an image (field 'image') or give a text (field 'q')")
        return {"query": q if image is None else image.filename, "hits": await ask("search", item)}

    @app.get("/image/{image_id}", summary="An indexed image, by its id from /search")
    async def image_file(image_id: str):
        path = server.indexed_file(image_id)
        return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

    @app.get("/thumbnail/{image_id}", summary="A JPEG thumbnail of an indexed image")
    async def thumbnail(image_id: str, size: int = Query(256, ge=16, le=1024)):
        data = await run_in_threadpool(server.thumbnail, image_id, size)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    if config.max_upload_mb:
        app.add_middleware(BodyLimit, limit=int(config.max_upload_mb * 2**20))
    return app


def _route_of(request) -> str:
    """The route template (``/image/{image_id}``), so ids do not each make a metrics row."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "(no route)"
