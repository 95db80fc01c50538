"""`ranking serve --index INDEX`: search an index folder over HTTP, the model loaded once (DESIGN.md "Search service").

    ranking serve --index my-index                   # http://127.0.0.1:8000/ : the page; /docs, /openapi.json
    curl -F image=@query.jpg 'http://127.0.0.1:8000/api/search?k=5'

The JSON API: POST /api/search (multipart field ``image``), GET /api/items/{id}/similar ("more like this"),
GET /api/items/{id}, GET /api/items/{id}/thumbnail.jpg, GET /api/index (model, size, rows), GET /api/health. Queries
that arrive together are embedded in one forward pass; when ``--queue-size`` queries already wait, the next is
answered 503 at once. Bad input (not an image, truncated, over the pixel or byte limit, an unknown id, a missing
field) is a 4xx with one line of JSON, ``{"error": "..."}``, and the server goes on. Only the index's own files are
read: the page, the API and each row's thumbnail from thumbs.tar (no route takes a path). Needs the ``serve`` extra:
pip install 'deep-ranking[serve]'.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoints' annotations (UploadFile, Query), imported
# inside create_app so that the package works without the extra, from the functions' own scope at definition time
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ranking import cli
from ranking.core.config import SearchBackendName
from ranking.core.errors import ConfigError, RankingError
from ranking.core.files import open_regular, shown_name
from ranking.core.flags import at_least, at_most, parse
from ranking.data.archive import MAX_FILE_BYTES
from ranking.data.decode import MAX_IMAGE_PIXELS, decode_image, read_header
from ranking.retrieval.backends import APPROXIMATE_ABOVE

if TYPE_CHECKING:
    from fastapi import FastAPI

    from ranking.retrieval.indexfolder import Index, Result

PAGE = Path(__file__).parent / "reporting" / "search_page.html"
MAX_TOP = 100


@dataclass
class ServeConfig:
    # the index
    index: str  # an index folder written by `ranking index`
    backend: SearchBackendName | None = None  # unset: exact up to --approximate-above rows, else ivf (faiss)
    approximate_above: int = APPROXIMATE_ABOVE  # rows from which an unset --backend means ivf
    device: str = "cpu"  # where to embed and search: cpu, cuda, auto (a GPU if any)
    threads: int = 1  # torch threads for the model and the search (0: torch's default)

    # the server
    host: str = "127.0.0.1"  # the address to listen on; 0.0.0.0 exposes the index to the network
    port: int = 8000  # 0: any free port (the first line printed names it)
    top: int = 10  # results per query unless the request asks (?k=, at most 100)
    max_batch: int = 16  # queries embedded in one forward pass at most
    queue_size: int = 64  # queries waiting at most; the next one is answered 503
    max_upload_bytes: int = MAX_FILE_BYTES  # an uploaded image larger than this is answered 413
    max_pixels: int = MAX_IMAGE_PIXELS  # an image declaring more pixels is answered 413, before decoding

    def validate(self) -> None:
        at_least("--threads", self.threads, 0)
        at_least("--port", self.port, 0)
        at_most("--port", self.port, 65535)
        at_least("--top", self.top, 1)
        at_most("--top", self.top, MAX_TOP)
        at_least("--max-batch", self.max_batch, 1)
        at_least("--queue-size", self.queue_size, 1)
        at_least("--max-upload-bytes", self.max_upload_bytes, 1)
        at_most("--max-upload-bytes", self.max_upload_bytes, MAX_FILE_BYTES)
        at_least("--max-pixels", self.max_pixels, 1)
        at_most("--max-pixels", self.max_pixels, MAX_IMAGE_PIXELS)
        at_least("--approximate-above", self.approximate_above, 0)
        if not self.index.strip():
            raise ConfigError("--index must name an index folder")


class BadRequest(Exception):
    """An answer other than 200: its status and one line."""

    def __init__(self, status: int, line: str):
        super().__init__(line)
        self.status = status
        self.line = line


def needs_extra() -> None:
    import importlib.util

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise RankingError(f"ranking serve needs {e.name}: pip install 'deep-ranking[serve]'") from None
    # FastAPI's form parser, python-multipart: module python_multipart, `multipart` before 0.0.13
    if not any(importlib.util.find_spec(name) for name in ("python_multipart", "multipart")):
        raise RankingError("ranking serve needs python-multipart: pip install 'deep-ranking[serve]'")


def result_json(result: "Result") -> dict[str, Any]:
    item = result.item
    return {
        "rank": result.rank,
        "distance": result.distance,
        "id": item.id,
        "file": item.file,
        "label": item.label if item.label >= 0 else None,
        "class": item.wnid,
        "words": item.words,
        "thumbnail": f"/api/items/{item.id}/thumbnail.jpg",
    }


def decode_upload(data: bytes, name: str, config: ServeConfig, image_size: int) -> Any:
    """An uploaded file -> uint8 [3, H, W] (``ranking.data.decode``), or a BadRequest saying why not."""
    if not data:
        raise BadRequest(400, f"{name}: empty file")
    try:
        header = read_header(data, name)
        if header.width * header.height > config.max_pixels:
            raise BadRequest(
                413, f"{name}: {header.width}x{header.height} pixels, over this server's limit of {config.max_pixels}"
            )
        return decode_image(data, name, image_size)
    except RankingError as e:
        status = 413 if "over the limit" in str(e) else 400
        raise BadRequest(status, str(e)) from None


def create_app(index: "Index", config: ServeConfig) -> "FastAPI":
    """The HTTP API and the page over ``index`` (already loaded, its backend chosen)."""
    from fastapi import FastAPI, Query, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ranking.retrieval.batching import QueryBatcher, QueueFull
    from ranking.retrieval.indexfolder import THUMBS, read_thumbnail_bytes

    batcher: QueryBatcher | None = None
    page = PAGE.read_text()

    thumbs: IO[bytes] | None = None

    @contextlib.asynccontextmanager
    async def lifespan(app: "FastAPI") -> AsyncIterator[None]:
        nonlocal batcher, thumbs
        batcher = QueryBatcher(index, config.max_batch, config.queue_size)
        batcher.start()
        with contextlib.ExitStack() as held:
            # the thumbnails of the rows in memory: `ranking index --add/--remove` publishes a new folder in the
            # index's place, and this open file stays the one whose offsets items.jsonl (in memory) records
            with contextlib.suppress(RankingError, OSError):
                assert index.path is not None
                thumbs = held.enter_context(open_regular(index.path / THUMBS))
            yield
        await batcher.stop()

    app = FastAPI(
        title="deep-ranking search",
        summary="nearest images of an index folder (`ranking serve`)",
        version="1",
        lifespan=lifespan,
    )

    def error(status: int, line: str) -> JSONResponse:
        return JSONResponse({"error": line}, status_code=status)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, e: BadRequest) -> JSONResponse:
        return error(e.status, e.line)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error(e.status_code, f"{shown_name(request.url.path)}: {e.detail}")  # a %0A stays escaped

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception) -> JSONResponse:  # a bug: still one line, and the server goes on
        return error(500, f"{shown_name(request.url.path)}: internal error ({type(e).__name__}: {shown_name(str(e))})")

    def item_at(item_id: int) -> Any:
        if not 0 <= item_id < len(index):
            raise BadRequest(404, f"no item {item_id} (this index holds ids 0 to {len(index) - 1})")
        return index.items[item_id]

    async def answered(search: Any, started: float) -> dict[str, Any]:
        try:
            results = await search
        except QueueFull as e:
            raise BadRequest(503, f"busy: {e}; retry shortly") from None
        except RankingError as e:
            raise BadRequest(400, str(e)) from None
        return {
            "results": [result_json(r) for r in results],
            "took_ms": round(1000 * (time.perf_counter() - started), 2),
        }

    k_query = Query(default=config.top, ge=1, le=MAX_TOP, description="results to return")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def home() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        assert batcher is not None
        return {"status": "ok", "rows": len(index), "waiting": batcher.queue.qsize(), "refused": batcher.stats.refused}

    @app.get("/api/index")
    async def describe() -> dict[str, Any]:
        """The index: its folder's name, rows, dimension, classes, the model's identity and the search backend."""
        assert batcher is not None
        return {
            "name": index.path.name if index.path else "",
            "rows": len(index),
            "dim": index.dim,
            "classes": len(index.classes),
            "model": index.model.spec.to_dict(),
            "flip": index.model.flip,
            "backend": index.backend.name,
            "batches": vars(batcher.stats),
        }

    @app.post("/api/search")
    async def search(image: UploadFile, k: int = k_query) -> dict[str, Any]:
        """The k nearest rows of an uploaded image (multipart field ``image``)."""
        started = time.perf_counter()
        assert batcher is not None
        name = f"upload {image.filename or 'image'!r}"
        data = await image.read(config.max_upload_bytes + 1)
        if len(data) > config.max_upload_bytes:
            raise BadRequest(413, f"{name}: over {config.max_upload_bytes} bytes")
        image_size = index.model.spec.image_size
        return await answered(batcher.search_image(lambda: decode_upload(data, name, config, image_size), k), started)

    @app.get("/api/items/{item_id}/similar")
    async def similar(item_id: int, k: int = k_query) -> dict[str, Any]:
        """The k nearest rows of the indexed row ``item_id`` ("more like this"; the row itself comes first)."""
        started = time.perf_counter()
        assert batcher is not None
        item_at(item_id)
        return await answered(batcher.search_row(item_id, k), started)

    @app.get("/api/items/{item_id}")
    async def item(item_id: int) -> dict[str, Any]:
        found = item_at(item_id)
        return {
            "id": found.id,
            "file": found.file,
            "label": found.label if found.label >= 0 else None,
            "class": found.wnid,
            "words": found.words,
            "thumbnail": f"/api/items/{found.id}/thumbnail.jpg",
        }

    @app.get("/api/items/{item_id}/thumbnail.jpg", response_class=Response)
    async def thumbnail(item_id: int) -> Response:
        found = item_at(item_id)
        assert index.path is not None
        if thumbs is None:
            raise BadRequest(404, f"{index.path}: holds no readable {THUMBS}")
        try:
            data = read_thumbnail_bytes(index.path / THUMBS, [found], thumbs)[found.id]
        except RankingError as e:
            raise BadRequest(404, str(e)) from None
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named, not 0: asyncio sets TCP_NODELAY on accepted connections only for IPPROTO_TCP sockets, and without
    # it a kept-alive client waits ~40 ms for every answer (Nagle against delayed ACKs)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RankingError(f"--host {host} --port {port}: cannot listen ({e.strerror})") from None
    sock.listen(2048)
    return sock


def open_index(config: ServeConfig) -> "Index":
    from ranking.retrieval import indexfolder
    from ranking.retrieval.inference import parse_device

    path = Path(config.index)
    if not indexfolder.is_index(path):
        raise RankingError(f"{path}: not an index folder (serve one written by `ranking index`)")
    index = indexfolder.Index.load(path, parse_device(config.device))
    index.use_backend(config.backend, config.approximate_above)
    return index


def main(argv: list[str] | None = None) -> int:
    config = parse(ServeConfig, argv, "ranking serve", __doc__.split("\n\n")[0], config_file=False)
    needs_extra()
    import torch
    import uvicorn

    if config.threads:
        torch.set_num_threads(config.threads)
    sock = listening_socket(config.host, config.port)  # a taken port fails before the model loads
    index = open_index(config)
    app = create_app(index, config)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"ranking serve: {index.path} ({len(index)} rows, {index.dim}-d, {index.backend.name} search) at "
        f"http://{shown}:{port}/",
        flush=True,
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return 0


if __name__ == "__main__":
    cli.run_stage(main, sys.argv[1:], "ranking.serve")
