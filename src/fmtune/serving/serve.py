"""`fmtune serve`: an authenticated HTTP API over a finished run's model, with micro-batching.

POST /v1/predict   {"texts": [...]}                        -> {"predictions": [{"label", "probabilities"}], "model"}
POST /v1/generate  {"prompts": [...], "max_new_tokens": n} -> {"completions": [...], "model"}  (generation runs)
GET  /v1/model     what is being served: base model, run, task, labels, data hash, ladder metrics
GET  /healthz      liveness, no auth;  /docs and /openapi.json: the API description, no auth, nothing about the run

Every other path needs `Authorization: Bearer KEY`, checked before the body is read. Keys come from FMTUNE_API_KEYS
and/or a key file and are never logged; a key in the query string is refused, and query strings are never logged.
Request bodies, texts per request, text length and the waiting queue are all bounded, so an overloaded server answers
413/422/503 instead of growing a backlog. /docs is a plain page served from here (no CDN), so it works offline.
"""

import asyncio
import hmac
import logging
import logging.config
import os
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable

from fmtune.errors import ConfigError, FmtuneError

if TYPE_CHECKING:
    import fastapi

log = logging.getLogger("fmtune.serving.serve")

API_KEYS_ENV = "FMTUNE_API_KEYS"
MIN_KEY_CHARS = 16
KEY_HINT = "generate one with `python -c \"import secrets; print(secrets.token_urlsafe(32))\"`"
RETRY_AFTER_SECONDS = 1
PUBLIC_PATHS = frozenset({"/healthz", "/docs", "/openapi.json"})  # served without a key; they say nothing about the run
# query parameters that look like credentials: refused wherever they appear, whatever their value
QUERY_KEY_NAMES = frozenset({"api_key", "apikey", "api-key", "key", "token", "access_token", "auth", "authorization", "bearer"})


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class ServeConfig:
    """How `fmtune serve` listens, authenticates and bounds its work (field help = the CLI's --help)."""

    host: str = field(default="127.0.0.1", metadata=_help("Address to listen on; 127.0.0.1 keeps the API on this machine."))
    port: int = field(default=8000, metadata=_help("TCP port to listen on."))
    api_keys: list[str] = field(default_factory=list, metadata=_help(f"Bearer keys accepted on /v1 (from {API_KEYS_ENV} and/or --api-key-file)."))
    no_auth: bool = field(default=False, metadata=_help("Serve /v1 without authentication (only for local experiments)."))
    max_batch_size: int = field(default=32, metadata=_help("Most texts the model sees in one forward pass."))
    max_wait_ms: float = field(default=5.0, metadata=_help("Longest a text waits for others to fill a batch, in milliseconds."))
    max_queue: int = field(default=256, metadata=_help("Most texts waiting for the model; beyond it requests get 503 + Retry-After."))
    max_texts_per_request: int = field(default=64, metadata=_help("Most texts (or prompts) in one request."))
    max_text_chars: int = field(default=10_000, metadata=_help("Most characters in one text (or prompt)."))
    max_body_bytes: int = field(default=1_000_000, metadata=_help("Largest request body, in bytes."))
    max_new_tokens: int = field(default=256, metadata=_help("Largest max_new_tokens a generation request may ask for."))
    micro_batching: bool = field(default=True, metadata=_help("Batch concurrent requests together (off: one request at a time)."))
    torch_threads: int | None = field(default=None, metadata=_help("CPU threads for the model (default: torch's choice); 1-2 on a busy machine."))
    runtime: str = field(default="torch", metadata=_help("torch (the run's model/) or onnx (its verified export/model.onnx, through ONNX Runtime; encoder classifiers)."))


def load_api_keys(api_key_file: Path | None) -> list[str]:
    """Keys from FMTUNE_API_KEYS (comma separated) and/or `api_key_file` (one per line; blank and # lines skipped)."""
    keys = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    if api_key_file is not None:
        path = Path(api_key_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"--api-key-file {path}: no such file. Write one key per line, e.g. {KEY_HINT} > {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return list(dict.fromkeys(keys))


def check_config(cfg: ServeConfig) -> None:
    """Every problem with `cfg` at once; messages name the setting but never print a key."""
    problems = []
    if not cfg.api_keys and not cfg.no_auth:
        problems.append(
            f"no API keys: set {API_KEYS_ENV}=KEY1,KEY2 or pass --api-key-file FILE (one key per line; {KEY_HINT}), "
            "or pass --no-auth to serve without authentication (local experiments only)"
        )
    for i, key in enumerate(cfg.api_keys):
        if len(key) < MIN_KEY_CHARS:
            problems.append(f"api key #{i + 1}: {len(key)} characters; use at least {MIN_KEY_CHARS} ({KEY_HINT})")
        if not key.isascii() or not key.isprintable() or any(c.isspace() for c in key):
            problems.append(f"api key #{i + 1}: only printable ASCII without spaces can travel in an Authorization header")
    if cfg.runtime not in ("torch", "onnx"):
        problems.append(f"runtime: {cfg.runtime!r}; choose torch or onnx")
    for name in ("port", "max_batch_size", "max_queue", "max_texts_per_request", "max_text_chars", "max_body_bytes", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            problems.append(f"{name}: {getattr(cfg, name)}; expected a positive number")
    if cfg.torch_threads is not None and cfg.torch_threads < 1:
        problems.append(f"torch_threads: {cfg.torch_threads}; expected a positive number (or leave it unset)")
    if cfg.max_wait_ms < 0:
        problems.append(f"max_wait_ms: {cfg.max_wait_ms}; expected 0 or more")
    if cfg.max_queue < cfg.max_texts_per_request:
        problems.append(
            f"max_queue ({cfg.max_queue}) is smaller than max_texts_per_request ({cfg.max_texts_per_request}): "
            "a full-size request could never be queued; raise max_queue or lower max_texts_per_request"
        )
    if problems:
        raise FmtuneError("cannot start fmtune serve:", problems)


class Busy(Exception):
    """The server cannot take this request now (queue full, or shutting down): answered with 503 + Retry-After."""


class MicroBatcher:
    """One worker gathers queued texts into batches (up to max_batch_size, or what arrived within max_wait_ms)."""

    def __init__(self, predict: Callable[[list[str]], list[Any]], max_batch_size: int, max_wait_ms: float, max_queue: int):
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self.queue: asyncio.Queue | None = None
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._current: list[tuple[str, asyncio.Future]] = []  # the batch the model is working on

    async def start(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.max_queue)
        self._arrived = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="fmtune-micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        pending = list(self._current)
        while self.queue is not None and not self.queue.empty():
            pending.append(self.queue.get_nowait())
        for _, future in pending:
            if not future.done():
                future.set_exception(Busy("the server is shutting down"))
        self._current = []

    def waiting(self) -> int:
        return self.queue.qsize() if self.queue is not None else 0

    async def submit(self, texts: list[str]) -> list[Any]:
        """Results for `texts`, in order; raises Busy instead of waiting for room."""
        if self._worker is None:  # served without lifespan events
            await self.start()
        assert self.queue is not None and self._arrived is not None
        if self.queue.maxsize - self.queue.qsize() < len(texts):
            raise Busy(f"more than {self.max_queue} texts are waiting (max_queue)")
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:  # no await in this loop: the request's texts enter the queue together
            future = loop.create_future()
            self.queue.put_nowait((text, future))
            futures.append(future)
        self._arrived.set()
        return list(await asyncio.gather(*futures))

    async def _gather(self) -> list[tuple[str, asyncio.Future]]:
        assert self.queue is not None and self._arrived is not None
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while True:
            while len(batch) < self.max_batch_size and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            remaining = deadline - loop.time()
            if len(batch) >= self.max_batch_size or remaining <= 0:
                return batch
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                pass

    async def _run(self) -> None:
        while True:
            batch = self._current = [(text, future) for text, future in await self._gather() if not future.done()]
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.predict, [text for text, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"the model returned {len(results)} results for {len(batch)} texts")
            except Exception as exc:  # the requests in this batch fail; the server keeps serving
                log.exception("prediction failed for a batch of %d texts", len(batch))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


class Serial:
    """One request at a time through a lock (the baseline without micro-batching), with a bounded wait list."""

    def __init__(self, run: Callable[..., list[Any]], max_queue: int):
        self.run = run
        self.max_queue = max_queue
        self._lock: asyncio.Lock | None = None
        self._waiting = 0

    async def start(self) -> None:
        self._lock = asyncio.Lock()

    async def stop(self) -> None:
        self._lock = None

    def waiting(self) -> int:
        return self._waiting

    async def submit(self, items: list[Any], **kwargs: Any) -> list[Any]:
        if self._lock is None:
            await self.start()
        lock = self._lock
        assert lock is not None
        if self._waiting + len(items) > self.max_queue:
            raise Busy(f"more than {self.max_queue} texts are waiting (max_queue)")
        self._waiting += len(items)
        try:
            await lock.acquire()
        finally:  # also when cancelled while waiting
            self._waiting -= len(items)
        try:
            return await asyncio.to_thread(self.run, items, **kwargs)
        except Exception:
            log.exception("the model failed on a request of %d items", len(items))
            raise
        finally:
            lock.release()


def run_name(predictor: Any) -> str:
    report = getattr(predictor, "report", None) or {}
    return str(report.get("run", {}).get("name") or Path(getattr(predictor, "run_dir", "model")).name)


def model_info(predictor: Any) -> dict:
    """What /v1/model answers: enough for a client to know exactly which model and evidence it is talking to."""
    report = getattr(predictor, "report", None) or {}
    task = report.get("task", {})
    return {
        "model": run_name(predictor),
        "task": task.get("type") or ("generation" if hasattr(predictor, "generate") else "classification"),
        "base_model": report.get("base_model", {}).get("name"),
        "labels": list(getattr(predictor, "labels", None) or []),
        "primary_metric": task.get("primary_metric"),
        "data_sha256": report.get("data", {}).get("sha256"),
        "ladder": {rung["name"]: rung.get("metrics", {}) for rung in report.get("ladder", []) if "name" in rung},
    }


def create_app(predictor: Any, cfg: ServeConfig) -> "fastapi.FastAPI":
    """The API for `predictor` (a fmtune.serving.predict.Predictor, or anything with .predict / .generate and .report)."""
    from fastapi import Security
    from fastapi.security import HTTPBearer

    check_config(cfg)
    info = model_info(predictor)
    schemas = _schemas(cfg, tuple(info["labels"]))
    runner, generator = _runners(predictor, cfg)
    app = _new_app(cfg, runner, generator)
    # Declares the scheme in /openapi.json; KeyGate has already checked the key before the request got here.
    bearer = HTTPBearer(auto_error=False, description="An API key from FMTUNE_API_KEYS or --api-key-file.")
    auth = [] if cfg.no_auth else [Security(bearer)]
    errors = _error_responses(cfg, schemas.Error)
    _add_info_routes(app, schemas, info, auth, errors)
    _add_predict_route(app, schemas, run_name(predictor), auth, errors, runner if callable(getattr(predictor, "predict", None)) else None)
    _add_generate_route(app, schemas, run_name(predictor), auth, errors, generator if callable(getattr(predictor, "generate", None)) else None)
    return app


def _schemas(cfg: ServeConfig, labels: tuple[str, ...]) -> SimpleNamespace:
    """The request and response models (their class names are the schema names in /openapi.json), sized by `cfg`."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

    # pattern: at least one non-space character (the CLI refuses blank texts too); documented in /openapi.json
    Text = Annotated[str, StringConstraints(min_length=1, max_length=cfg.max_text_chars, pattern=r"\S")]
    # answers are checked against the run's labels, but the public /openapi.json shows a plain string (labels need a key)
    Label = Annotated[Literal[labels], WithJsonSchema({"type": "string"})] if labels else str  # type: ignore[valid-type]

    class PredictRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        texts: list[Text] = Field(min_length=1, max_length=cfg.max_texts_per_request, description="Texts to classify.")

    class Prediction(BaseModel):
        label: Label = Field(description="The most probable label.")  # type: ignore[valid-type]
        probabilities: dict[str, float] = Field(description="Probability of every label; they sum to 1.")

    class PredictResponse(BaseModel):
        predictions: list[Prediction] = Field(description="One prediction per text, in the order sent.")
        model: str = Field(description="Name of the run being served.")

    class GenerateRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompts: list[Text] = Field(min_length=1, max_length=cfg.max_texts_per_request)
        max_new_tokens: int = Field(default=min(64, cfg.max_new_tokens), ge=1, le=cfg.max_new_tokens)

    class GenerateResponse(BaseModel):
        completions: list[str] = Field(description="One completion per prompt, in the order sent.")
        model: str

    class ModelInfo(BaseModel):
        model: str
        task: str
        base_model: str | None
        labels: list[str]
        primary_metric: str | None
        data_sha256: str | None
        ladder: dict[str, dict[str, float]] = Field(description="Held-out metrics of every ladder rung, from report.json.")

    class Health(BaseModel):
        status: Literal["ok"]

    class Error(BaseModel):
        detail: str

    return SimpleNamespace(PredictRequest=PredictRequest, PredictResponse=PredictResponse, GenerateRequest=GenerateRequest,
                           GenerateResponse=GenerateResponse, ModelInfo=ModelInfo, Health=Health, Error=Error)


def _error_responses(cfg: ServeConfig, error: type) -> dict[int, dict]:
    """The errors every /v1 call can answer, as documented in /openapi.json."""
    return {
        400: {"model": error, "description": "The body could not be read (not UTF-8 JSON, or a bad Content-Length)."},
        401: {"model": error, "description": "Missing or wrong bearer key."},
        413: {"model": error, "description": f"Request body over {cfg.max_body_bytes} bytes."},
        503: {"model": error, "description": "Too many texts waiting; retry after the Retry-After seconds.",
              "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "Seconds to wait."}}},
    }


def _runners(predictor: Any, cfg: ServeConfig) -> tuple[MicroBatcher | Serial, Serial]:
    """What queues the work: classification through the micro-batcher (or one request at a time), generation serially."""
    if cfg.micro_batching:
        runner: MicroBatcher | Serial = MicroBatcher(
            lambda texts: predictor.predict(texts, batch_size=cfg.max_batch_size), cfg.max_batch_size, cfg.max_wait_ms, cfg.max_queue
        )
    else:
        runner = Serial(lambda texts: predictor.predict(texts, batch_size=cfg.max_batch_size), cfg.max_queue)
    generator = Serial(lambda prompts, max_new_tokens: predictor.generate(prompts, max_new_tokens=max_new_tokens), cfg.max_queue)
    return runner, generator


def _new_app(cfg: ServeConfig, runner: MicroBatcher | Serial, generator: Serial) -> "fastapi.FastAPI":
    """The app without its /v1 routes: the runners started and stopped with it, the key gate and body limit around it,
    validation errors that name the limit hit, and the self-contained /docs page."""
    from fastapi import FastAPI, Request
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await runner.start()
        await generator.start()
        try:
            yield
        finally:
            await runner.stop()
            await generator.stop()

    app = FastAPI(
        title="fmtune serve",
        version="1",
        # public (no key): nothing here names the run, its labels or its files; GET /v1/model tells that, with a key
        description="Predictions from a fine-tuned fmtune run. Send `Authorization: Bearer KEY` on every /v1 call "
                    "(never a key in the URL); GET /v1/model says which run and labels are served.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's Swagger UI and ReDoc load from a CDN (blank offline): /docs below is self-contained
        redoc_url=None,
    )
    app.state.runner = runner
    app.state.config = cfg
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(KeyGate, keys=[] if cfg.no_auth else cfg.api_keys)  # added last = runs first: before BodyLimit

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder([_explain(e, cfg) for e in exc.errors()])})

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_page(app.openapi()))

    return app


async def _answer(runner: MicroBatcher | Serial, items: list[str], **kwargs: Any) -> list[Any]:
    """The runner's results, or the HTTP error a client can act on."""
    from fastapi import HTTPException

    try:
        return await runner.submit(items, **kwargs)
    except Busy as exc:
        raise HTTPException(503, f"busy: {exc}; retry after {RETRY_AFTER_SECONDS} s",
                            headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    except Exception:  # the runner logged it with its traceback
        raise HTTPException(500, "the model failed on this request; the server log has the details") from None


def _add_info_routes(app: "fastapi.FastAPI", schemas: SimpleNamespace, info: dict, auth: list, errors: dict) -> None:
    """GET /healthz (no key) and GET /v1/model (what is being served)."""

    @app.get("/healthz", response_model=schemas.Health, tags=["health"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/v1/model", response_model=schemas.ModelInfo, dependencies=auth, responses={401: errors[401]}, tags=["model"])
    async def model() -> dict:
        return info


def _add_predict_route(app: "fastapi.FastAPI", schemas: SimpleNamespace, name: str, auth: list, errors: dict,
                       runner: MicroBatcher | Serial | None) -> None:
    """POST /v1/predict: through `runner`, or 404 pointing to /v1/generate when the run is not a classifier (None)."""
    from fastapi.responses import JSONResponse

    PredictRequest = schemas.PredictRequest  # a plain name: FastAPI reads the body's model from the annotation
    if runner is not None:
        @app.post("/v1/predict", response_model=schemas.PredictResponse, dependencies=auth, responses=errors, tags=["predict"])
        async def predict(body: PredictRequest) -> dict:
            return {"predictions": await _answer(runner, body.texts), "model": name}
    else:
        @app.post("/v1/predict", dependencies=auth, responses={401: errors[401], 404: {"model": schemas.Error}}, tags=["predict"])
        async def predict() -> JSONResponse:
            return JSONResponse(status_code=404, content={"detail": "this run is a generation model; use /v1/generate"})


def _add_generate_route(app: "fastapi.FastAPI", schemas: SimpleNamespace, name: str, auth: list, errors: dict,
                        generator: Serial | None) -> None:
    """POST /v1/generate: through `generator`, or 404 pointing to /v1/predict when the run does not generate (None)."""
    from fastapi.responses import JSONResponse

    GenerateRequest = schemas.GenerateRequest  # a plain name: FastAPI reads the body's model from the annotation
    if generator is not None:
        @app.post("/v1/generate", response_model=schemas.GenerateResponse, dependencies=auth, responses=errors, tags=["generate"])
        async def generate(body: GenerateRequest) -> dict:
            completions = await _answer(generator, body.prompts, max_new_tokens=body.max_new_tokens)
            return {"completions": [str(c) for c in completions], "model": name}
    else:
        @app.post("/v1/generate", dependencies=auth, responses={401: errors[401], 404: {"model": schemas.Error}}, tags=["generate"])
        async def generate() -> JSONResponse:
            return JSONResponse(status_code=404, content={"detail": "this run is a classification model; use /v1/predict"})


def _explain(error: dict, cfg: ServeConfig) -> dict:
    """Pydantic's validation error, reworded to name the server limit that was hit. The client's input is never echoed
    (it may be long, private, or not even encodable: a lone surrogate), and a key name in `loc` is made printable."""
    loc = tuple(p.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(p, str) else p for p in error.get("loc", ()))
    kind = error.get("type")
    field_name = loc[1] if len(loc) > 1 else ""
    msg = None
    if len(loc) == 2 and kind == "too_long":
        msg = (f"too many {field_name}: at most {cfg.max_texts_per_request} per request (max_texts_per_request); "
               "split them over several requests")
    elif len(loc) == 2 and kind == "too_short":
        msg = f"{field_name} is empty; send at least one"
    elif len(loc) == 3 and kind == "string_too_long":
        msg = (f"{field_name}[{loc[2]}] has {len(error.get('input', ''))} characters; the limit is {cfg.max_text_chars} "
               "(max_text_chars); shorten or split it")
    elif len(loc) == 3 and kind == "string_too_short":
        msg = f"{field_name}[{loc[2]}] is empty; every text needs at least one character"
    elif len(loc) == 3 and kind == "string_pattern_mismatch":
        msg = f"{field_name}[{loc[2]}] is blank (only whitespace); every text needs at least one non-space character"
    elif kind == "string_unicode":
        where = f"{field_name}[{loc[2]}]" if len(loc) == 3 else "a key or value of the body"
        msg = (f"{where} is not valid Unicode text: it holds a lone surrogate (half of a UTF-16 pair, e.g. an emoji cut "
               "in two, sent as a \\udXXX escape); send whole characters")
    if msg is None:
        return {**{k: v for k, v in error.items() if k not in ("input", "url")}, "loc": list(loc)}
    return {"loc": list(loc), "msg": msg, "type": kind}


def docs_page(spec: dict) -> str:
    """/docs: the endpoints and a link to /openapi.json, in one self-contained page (nothing from another host)."""
    from html import escape

    rows = "".join(
        f"<tr><td>{escape(method.upper())}</td><td><code>{escape(path)}</code></td><td>{escape(op.get('summary', ''))}</td>"
        f"<td>{'bearer key' if op.get('security') else 'none'}</td></tr>"
        for path, operations in spec.get("paths", {}).items() for method, op in operations.items()
    )
    info = spec.get("info", {})
    return (
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>{escape(info.get('title', ''))}</title></head><body>"
        f"<h1>{escape(info.get('title', ''))}</h1><p>{escape(info.get('description', ''))}</p>"
        f"<table><tr><th>method</th><th>path</th><th>what</th><th>auth</th></tr>{rows}</table>"
        "<p>Request and response schemas, limits and error codes: <a href=\"/openapi.json\">/openapi.json</a> "
        "(OpenAPI 3, for any OpenAPI viewer or client generator).</p></body></html>"
    )


class KeyGate:
    """ASGI middleware, outermost: refuses a key in the query string anywhere, then checks `Authorization: Bearer KEY`
    on every path but PUBLIC_PATHS, before a byte of the body is read (no valid key: 401, whatever the body holds).
    `keys` empty (--no-auth): only the query-string check."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        client = scope["client"][0] if scope.get("client") else "?"
        in_query = self._key_in_query(scope.get("query_string", b""))
        if in_query:
            # logs the path only: the query (and the key in it) is never logged
            log.warning("refused %s %s from %s: an API key in the query string (%s)", scope["method"], scope["path"], client, in_query)
            return await _json_reply(send, 401, (
                f"an API key in the query string ({in_query}) is refused: URLs end up in logs, proxies and browser history. "
                "Send the header `Authorization: Bearer KEY` instead, and replace a key that has been sent in a URL"
            ), ((b"www-authenticate", b"Bearer"),))
        if not self.keys or scope["path"] in PUBLIC_PATHS:
            return await self.app(scope, receive, send)
        header = next((value for name, value in scope.get("headers") or [] if name == b"authorization"), b"")
        scheme, _, sent = header.partition(b" ")
        is_bearer = scheme.lower() == b"bearer" and bool(sent)
        ok = False
        for key in self.keys:  # compare with every key, constant time, no early exit
            ok |= hmac.compare_digest(sent if is_bearer else b"", key)
        if not ok:
            why = "a wrong bearer key" if is_bearer else "no bearer key"
            log.warning("rejected %s %s from %s: %s", scope["method"], scope["path"], client, why)
            return await _json_reply(send, 401, (
                f"{why}: send the header `Authorization: Bearer KEY` with a key from the server's {API_KEYS_ENV} or key file"
            ), ((b"www-authenticate", b"Bearer"),))
        await self.app(scope, receive, send)

    def _key_in_query(self, query_string: bytes) -> str:
        """Which query parameter carries a key ('' if none): a credential-like name, or any value equal to a key."""
        from urllib.parse import parse_qsl

        for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            if name.lower() in QUERY_KEY_NAMES:
                return f"parameter '{name.lower()}'"
            hit = False
            for key in self.keys:
                hit |= hmac.compare_digest(value.encode("utf-8", "replace"), key)
            if hit:
                return "a parameter whose value is a key"
        return ""


class BodyLimit:
    """ASGI middleware: 413 when Content-Length or the bytes actually received exceed max_bytes."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                return await _json_reply(send, 400, "Content-Length is not a number")
            if int(declared) > self.max_bytes:
                return await _json_reply(send, 413, self._too_big(int(declared)))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await _json_reply(send, 413, self._too_big(size, at_least=True))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_big(self, size: int, at_least: bool = False) -> str:
        return (f"request body of {'more than ' if at_least else ''}{size} bytes is over the limit of {self.max_bytes} bytes "
                "(max_body_bytes); send fewer or shorter texts per request")


async def _json_reply(send, status: int, detail: str, headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Answer {"detail": ...} straight from a middleware; the connection closes (the body may not have been read)."""
    import json

    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})


class NoQueryString(logging.Filter):
    """Cuts the query string off the paths in uvicorn's access log lines (its args are client, method, path?query,
    HTTP version, status), so that nothing a client puts in a URL (say ?api_key=...) is ever written to the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(arg.split("?", 1)[0] if isinstance(arg, str) else arg for arg in record.args)
        return True


def serve(run_dir: Path, cfg: ServeConfig) -> None:
    """Load the run's model (a classifier, or a generator for a generation run) and serve it with uvicorn until
    interrupted (Ctrl-C)."""
    import copy

    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from fmtune.serving.predict import load_predictor

    check_config(cfg)
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    if cfg.runtime == "onnx":  # the export `fmtune export RUN --format onnx` wrote and checked against the run's model
        from fmtune.serving.export import OnnxPredictor

        predictor = OnnxPredictor.from_run(run_dir, threads=cfg.torch_threads)
    else:
        predictor = load_predictor(run_dir)  # by report.json's task.type: /v1/generate or /v1/predict
    app = create_app(predictor, cfg)
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["fmtune"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    log_config.setdefault("filters", {})["no_query_string"] = {"()": NoQueryString}
    log_config["loggers"]["uvicorn.access"]["filters"] = ["no_query_string"]  # on the logger: every handler gets it
    logging.config.dictConfig(log_config)
    auth = "no authentication (--no-auth)" if cfg.no_auth else f"bearer keys ({len(cfg.api_keys)} configured)"
    log.info("serving run %s (%s) on http://%s:%d, docs at /docs, %s", run_name(predictor), model_info(predictor)["task"], cfg.host, cfg.port, auth)
    if cfg.no_auth and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("--no-auth on %s: anyone who can reach this address can use the model", cfg.host)
    # Uvicorn's access log records method, path (without its query string: NoQueryString) and status; never headers,
    # so never keys.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=log_config, log_level="info", server_header=False)
