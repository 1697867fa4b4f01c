"""fmtune serve: the HTTP API through FastAPI's TestClient, on a tiny random BERT run folder and on predictor stubs."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fmtune.errors import ConfigError, FmtuneError
from fmtune.serving.serve import Busy, MicroBatcher, ServeConfig, create_app, load_api_keys, serve

FIXTURES = Path(__file__).parent / "fixtures"
KEY = "test-key-0123456789abcdef"
OTHER_KEY = "second-key-abcdefghijklmnop"
AUTH = {"Authorization": f"Bearer {KEY}"}
WORDS = ["good", "bad", "great", "awful", "movie", "film", "plot", "fun", "boring", "the", "a", "was", "is", "not", "very"]


def build_tiny_run(root: Path) -> Path:
    """A finished-run folder: model/ (random 2-layer BERT classifier, safetensors) + report.json + manifest.json."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    run = root / "tiny-run"
    model_dir = run / "model"
    model_dir.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"bcdefghijklmnopqrstuvwxyz"]
    # transformers 5 takes the vocabulary itself (a vocab_file argument is ignored: every token would be [UNK])
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=64)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    BertForSequenceClassification(config).save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    report = json.loads((FIXTURES / "report_example.json").read_text())
    report["run"]["name"] = "tiny-run"
    report["task"]["labels"] = ["neg", "pos"]
    (run / "report.json").write_text(json.dumps(report))
    (run / "manifest.json").write_text(json.dumps({"seed": 0}))
    return run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return build_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def predictor(tiny_run):
    from fmtune.serving.predict import Predictor

    return Predictor.from_run(tiny_run, bf16=False)


@pytest.fixture
def client(predictor):
    with TestClient(create_app(predictor, ServeConfig(api_keys=[KEY, OTHER_KEY]))) as c:
        yield c


class StubPredictor:
    """Classifies by keyword; records every batch; optionally blocks until `release` is set."""

    labels = ["neg", "pos"]
    run_dir = Path("runs/stub")
    report = {"run": {"name": "stub"}, "task": {"type": "classification"}}

    def __init__(self, block: bool = False, delay: float = 0.0):
        self.batches: list[list[str]] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.block, self.delay = block, delay
        self.active = self.max_active = 0
        self._lock = threading.Lock()

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict]:
        with self._lock:
            self.batches.append(list(texts))
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.set()
        if self.block:
            assert self.release.wait(10), "test never released the stub"
        time.sleep(self.delay)
        with self._lock:
            self.active -= 1
        return [{"label": "pos" if "good" in t else "neg", "probabilities": {"neg": 0.0 if "good" in t else 1.0, "pos": 1.0 if "good" in t else 0.0}} for t in texts]


def post_concurrently(client: TestClient, bodies: list[dict], headers=AUTH) -> list:
    responses: list = [None] * len(bodies)

    def one(i: int) -> None:
        responses[i] = client.post("/v1/predict", json=bodies[i], headers=headers)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return responses


# --- predict on the real tiny model ---------------------------------------------------------------------------------

def test_predict_returns_one_normalised_prediction_per_text_in_order(client, predictor):
    texts = ["good fun movie", "awful boring plot", "the film was not very good", "bad"]
    r = client.post("/v1/predict", json={"texts": texts}, headers=AUTH)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-run"
    assert len(body["predictions"]) == 4
    for text, pred in zip(texts, body["predictions"]):
        assert pred["label"] in ["neg", "pos"]
        assert set(pred["probabilities"]) == {"neg", "pos"}
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        alone = predictor.predict([text])[0]  # same text on its own: same answer, so order was kept
        assert pred["label"] == alone["label"]
        for lab in ("neg", "pos"):
            assert pred["probabilities"][lab] == pytest.approx(alone["probabilities"][lab], abs=1e-4)
    # same length, different words: different outputs (the tokenizer really reads the words)
    assert body["predictions"][0]["probabilities"] != body["predictions"][1]["probabilities"]


def test_second_key_is_accepted(client):
    r = client.post("/v1/predict", json={"texts": ["good"]}, headers={"Authorization": f"Bearer {OTHER_KEY}"})
    assert r.status_code == 200


# --- authentication -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}, {"Authorization": f"Basic {KEY}"},
                                     {"Authorization": f"Bearer {KEY}x"}, {"Authorization": f"Bearer {KEY[:-1]}"}])
def test_predict_without_the_right_key_is_401(client, headers):
    r = client.post("/v1/predict", json={"texts": ["good"]}, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer KEY" in r.json()["detail"]
    assert KEY not in r.text


def test_model_info_needs_auth_and_describes_the_run(client):
    assert client.get("/v1/model").status_code == 401
    r = client.get("/v1/model", headers=AUTH)
    assert r.status_code == 200
    info = r.json()
    assert info["model"] == "tiny-run"
    assert info["task"] == "classification"
    assert info["base_model"] == "minilm"
    assert info["labels"] == ["neg", "pos"]
    assert info["data_sha256"] == "3f2a9c0d5e..."
    assert info["primary_metric"] == "macro_f1"
    assert info["ladder"]["fine_tuned"] == {"macro_f1": 0.79, "accuracy": 0.80}
    assert list(info["ladder"]) == ["zero_shot", "few_shot", "head_only", "fine_tuned", "from_scratch"]


def test_healthz_and_docs_need_no_auth(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    texts = spec["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert texts["minItems"] == 1 and texts["maxItems"] == 64
    assert texts["items"]["minLength"] == 1 and texts["items"]["maxLength"] == 10000
    assert "HTTPBearer" in spec["components"]["securitySchemes"]


def test_no_auth_mode_serves_without_a_key(predictor):
    with TestClient(create_app(predictor, ServeConfig(no_auth=True))) as c:
        assert c.post("/v1/predict", json={"texts": ["good"]}).status_code == 200
        assert c.get("/v1/model").status_code == 200


def test_refuses_to_start_without_keys(predictor):
    with pytest.raises(FmtuneError) as err:
        create_app(predictor, ServeConfig())
    assert "FMTUNE_API_KEYS" in str(err.value) and "--api-key-file" in str(err.value) and "--no-auth" in str(err.value)


def test_config_problems_are_reported_together_without_the_key(predictor):
    with pytest.raises(FmtuneError) as err:
        create_app(predictor, ServeConfig(api_keys=["short key"], max_queue=8, max_texts_per_request=64, max_batch_size=0))
    msg = str(err.value)
    assert "api key #1: 9 characters; use at least 16" in msg
    assert "printable ASCII without spaces" in msg
    assert "max_queue (8) is smaller than max_texts_per_request (64)" in msg
    assert "max_batch_size: 0" in msg
    assert "short key" not in msg


def test_load_api_keys_reads_env_and_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FMTUNE_API_KEYS", f" {KEY} ,,{OTHER_KEY}")
    f = tmp_path / "keys.txt"
    f.write_text(f"# team keys\n\nthird-key-0123456789abcdef\n{KEY}\n")
    assert load_api_keys(f) == [KEY, OTHER_KEY, "third-key-0123456789abcdef"]
    monkeypatch.delenv("FMTUNE_API_KEYS")
    assert load_api_keys(None) == []
    with pytest.raises(ConfigError, match="no such file"):
        load_api_keys(tmp_path / "missing.txt")


# --- limits -------------------------------------------------------------------------------------------------------

def test_body_over_the_limit_is_413(predictor):
    cfg = ServeConfig(api_keys=[KEY], max_body_bytes=1000)
    with TestClient(create_app(predictor, cfg)) as c:
        r = c.post("/v1/predict", json={"texts": ["good " * 300]}, headers=AUTH)
        assert r.status_code == 413
        assert "over the limit of 1000 bytes (max_body_bytes)" in r.json()["detail"]
        # no Content-Length (chunked): the bytes received are counted
        r = c.post("/v1/predict", content=iter([b'{"texts": ["', b"a" * 2000, b'"]}']), headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 413
        assert "more than" in r.json()["detail"]
        assert c.post("/v1/predict", json={"texts": ["good"]}, headers=AUTH).status_code == 200


def test_too_many_texts_is_422_naming_the_limit(client):
    r = client.post("/v1/predict", json={"texts": ["good"] * 65}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "too many texts: at most 64 per request (max_texts_per_request); split them over several requests"


def test_text_too_long_is_422_naming_the_limit(client):
    r = client.post("/v1/predict", json={"texts": ["good", "a" * 10001]}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "texts[1] has 10001 characters; the limit is 10000 (max_text_chars); shorten or split it"
    assert "a" * 100 not in r.text  # the text is not echoed back


@pytest.mark.parametrize("body, expected", [
    ({"texts": []}, "texts is empty; send at least one"),
    ({"texts": ["good", ""]}, "texts[1] is empty; every text needs at least one character"),
    ({"texts": "good"}, "Input should be a valid list"),
    ({"texts": [1, 2]}, "Input should be a valid string"),
    ({"text": ["good"]}, "Field required"),
    (["good"], "Input should be a valid dictionary or object to extract fields from"),
])
def test_malformed_bodies_are_422(client, body, expected):
    r = client.post("/v1/predict", json=body, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == expected


def test_invalid_json_is_422(client):
    r = client.post("/v1/predict", content=b'{"texts": [', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422


def test_unauthenticated_bad_body_gets_401_not_validation_details(client):
    assert client.post("/v1/predict", json={"texts": []}).status_code == 401


# --- queueing and micro-batching ----------------------------------------------------------------------------------

@pytest.mark.parametrize("micro_batching", [True, False])
def test_full_queue_is_503_with_retry_after(micro_batching):
    stub = StubPredictor(block=True)
    cfg = ServeConfig(api_keys=[KEY], max_queue=1, max_texts_per_request=1, max_batch_size=1, micro_batching=micro_batching)
    app = create_app(stub, cfg)
    with TestClient(app) as c:
        results: dict = {}
        first = threading.Thread(target=lambda: results.setdefault("first", c.post("/v1/predict", json={"texts": ["good 1"]}, headers=AUTH)))
        first.start()
        assert stub.entered.wait(10)  # the model is busy with the first request
        second = threading.Thread(target=lambda: results.setdefault("second", c.post("/v1/predict", json={"texts": ["good 2"]}, headers=AUTH)))
        second.start()
        deadline = time.monotonic() + 10
        while app.state.runner.waiting() < 1 and time.monotonic() < deadline:  # the second one waits in the queue
            time.sleep(0.005)
        assert app.state.runner.waiting() == 1
        third = c.post("/v1/predict", json={"texts": ["good 3"]}, headers=AUTH)
        assert third.status_code == 503
        assert third.headers["retry-after"] == "1"
        assert "max_queue" in third.json()["detail"]
        stub.release.set()
        first.join(10)
        second.join(10)
    assert results["first"].status_code == 200 and results["second"].status_code == 200
    assert [b for b in stub.batches] == [["good 1"], ["good 2"]]


def test_concurrent_requests_are_batched_and_answered_in_order():
    stub = StubPredictor(delay=0.05)
    cfg = ServeConfig(api_keys=[KEY], max_batch_size=32, max_wait_ms=20)
    with TestClient(create_app(stub, cfg)) as c:
        bodies = [{"texts": [f"good {i}", f"bad {i}"] if i % 2 else [f"bad {i}", f"good {i}"]} for i in range(12)]
        responses = post_concurrently(c, bodies)
    assert [r.status_code for r in responses] == [200] * 12
    for i, r in enumerate(responses):
        labels = [p["label"] for p in r.json()["predictions"]]
        assert labels == (["pos", "neg"] if i % 2 else ["neg", "pos"])
    sizes = [len(b) for b in stub.batches]
    assert sum(sizes) == 24
    assert max(sizes) > 2  # texts of different requests shared a forward pass
    assert all(s <= 32 for s in sizes)


def test_batches_never_exceed_max_batch_size():
    stub = StubPredictor(delay=0.02)
    with TestClient(create_app(stub, ServeConfig(api_keys=[KEY], max_batch_size=3, max_wait_ms=50))) as c:
        responses = post_concurrently(c, [{"texts": [f"good {i}", f"x {i}"]} for i in range(6)])
    assert all(r.status_code == 200 for r in responses)
    assert sum(len(b) for b in stub.batches) == 12
    assert max(len(b) for b in stub.batches) == 3


def test_without_micro_batching_each_request_runs_alone():
    stub = StubPredictor(delay=0.02)
    with TestClient(create_app(stub, ServeConfig(api_keys=[KEY], micro_batching=False))) as c:
        responses = post_concurrently(c, [{"texts": [f"good {i}", f"x {i}"]} for i in range(6)])
    assert all(r.status_code == 200 for r in responses)
    assert sorted(stub.batches) == sorted([[f"good {i}", f"x {i}"] for i in range(6)])
    assert stub.max_active == 1


@pytest.mark.parametrize("micro_batching", [True, False])
def test_a_failing_model_gives_500_and_the_server_keeps_serving(micro_batching):
    class Flaky(StubPredictor):
        def predict(self, texts, batch_size=64):
            if any("boom" in t for t in texts):
                raise RuntimeError("model exploded")
            return super().predict(texts, batch_size)

    with TestClient(create_app(Flaky(), ServeConfig(api_keys=[KEY], micro_batching=micro_batching)), raise_server_exceptions=False) as c:
        r = c.post("/v1/predict", json={"texts": ["boom"]}, headers=AUTH)
        assert r.status_code == 500 and r.json()["detail"] == "the model failed on this request; the server log has the details"
        assert c.post("/v1/predict", json={"texts": ["good"]}, headers=AUTH).json()["predictions"][0]["label"] == "pos"


def test_stopping_the_batcher_fails_waiting_requests_with_busy():
    stub = StubPredictor(block=True)
    batcher = MicroBatcher(stub.predict, max_batch_size=1, max_wait_ms=0, max_queue=4)

    async def scenario():
        await batcher.start()
        running = asyncio.ensure_future(batcher.submit(["good 1"]))
        waiting = asyncio.ensure_future(batcher.submit(["good 2"]))
        while not stub.entered.is_set():
            await asyncio.sleep(0.001)
        await batcher.stop()
        stub.release.set()
        return await asyncio.gather(running, waiting, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert [type(o) for o in outcomes] == [Busy, Busy]
    assert str(outcomes[1]) == "the server is shutting down"


def test_serve_refuses_to_start_without_keys_before_loading_the_model(tmp_path):
    with pytest.raises(FmtuneError, match="no API keys"):
        serve(tmp_path / "not-even-a-run", ServeConfig())


# --- generation routing -------------------------------------------------------------------------------------------

def test_generate_on_a_classification_run_says_use_predict(client):
    r = client.post("/v1/generate", json={"prompts": ["hi"], "max_new_tokens": 5}, headers=AUTH)
    assert r.status_code == 404
    assert r.json()["detail"] == "this run is a classification model; use /v1/predict"
    assert client.post("/v1/generate", json={"prompts": ["hi"]}).status_code == 401


def test_a_generation_predictor_plugs_in():
    class Generator:
        run_dir = Path("runs/gen")
        report = {"run": {"name": "gen"}, "task": {"type": "generation", "primary_metric": "rouge_l"}}

        def generate(self, prompts, max_new_tokens=64):
            return [f"{p} -> {max_new_tokens}" for p in prompts]

    with TestClient(create_app(Generator(), ServeConfig(api_keys=[KEY]))) as c:
        r = c.post("/v1/generate", json={"prompts": ["a", "b"], "max_new_tokens": 7}, headers=AUTH)
        assert r.status_code == 200
        assert r.json() == {"completions": ["a -> 7", "b -> 7"], "model": "gen"}
        assert c.post("/v1/generate", json={"prompts": ["a"], "max_new_tokens": 257}, headers=AUTH).status_code == 422
        r = c.post("/v1/predict", json={"texts": ["a"]}, headers=AUTH)
        assert r.status_code == 404 and r.json()["detail"] == "this run is a generation model; use /v1/generate"
        assert c.get("/v1/model", headers=AUTH).json()["task"] == "generation"


# --- logs never hold keys -----------------------------------------------------------------------------------------

def test_api_keys_never_appear_in_logs(predictor, caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(predictor, ServeConfig(api_keys=[KEY, OTHER_KEY]))) as c:
        assert c.post("/v1/predict", json={"texts": ["good"]}, headers=AUTH).status_code == 200
        assert c.post("/v1/predict", json={"texts": ["good"]}, headers={"Authorization": "Bearer wrong-key-0123456789abcdef"}).status_code == 401
        assert c.get("/v1/model", headers={"Authorization": f"Bearer {OTHER_KEY}"}).status_code == 200
        assert c.post("/v1/predict", json={"texts": [""]}, headers=AUTH).status_code == 422
    assert "rejected POST /v1/predict" in caplog.text  # something was logged about the auth failure...
    for secret in (KEY, OTHER_KEY, "wrong-key-0123456789abcdef"):
        assert secret not in caplog.text  # ...but never a key


# --- schema conformance (schemathesis) -----------------------------------------------------------------------------

def test_openapi_conformance_with_schemathesis(predictor):
    """Valid and invalid requests, with and without a key: never a 5xx, every response as the spec documents it."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation.modes import GenerationMode

    app = create_app(predictor, ServeConfig(api_keys=[KEY], max_text_chars=200, max_texts_per_request=8))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: collections.Counter = collections.Counter()
    for operation in schema.get_all_operations():
        op = operation.ok()
        for mode, headers in ((GenerationMode.POSITIVE, AUTH), (GenerationMode.NEGATIVE, AUTH), (GenerationMode.POSITIVE, {})):
            if mode == GenerationMode.NEGATIVE and not list(op.body):
                continue  # nothing to get wrong

            @given(case=op.as_strategy(generation_mode=mode))
            @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None, derandomize=True)
            def check(case):
                response = case.call_and_validate(headers=headers)
                statuses[response.status_code] += 1
                assert response.status_code < 500

            check()
    assert {200, 401, 404, 422} <= set(statuses), statuses


# --- hygiene from the security review ------------------------------------------------------------------------------

class SecretiveStub(StubPredictor):
    """A run whose name, labels, base model and folder are distinctive strings that a public page must not show."""

    labels = ["label-alpha-7f3", "label-beta-9c1"]
    run_dir = Path("/srv/private/runs/run-name-5d2e")
    report = {"run": {"name": "run-name-5d2e"}, "task": {"type": "classification"}, "base_model": {"name": "base-model-8a4b"}}

    def predict(self, texts, batch_size=64):
        return [{"label": "label-alpha-7f3", "probabilities": {"label-alpha-7f3": 1.0, "label-beta-9c1": 0.0}} for _ in texts]


class EchoGenerator:
    run_dir = Path("runs/gen")
    report = {"run": {"name": "gen"}, "task": {"type": "generation"}}

    def generate(self, prompts, max_new_tokens=64):
        return [f"{p} -> {max_new_tokens}" for p in prompts]


@pytest.mark.parametrize("url, headers", [
    (f"/v1/predict?api_key={KEY}", AUTH),  # even with the right header too: the key has been put in a URL
    (f"/v1/predict?api_key={KEY}", {}),
    (f"/v1/predict?token={KEY}&x=1", AUTH),
    (f"/v1/predict?k={KEY}", {}),  # any parameter holding a key
])
def test_a_key_in_the_query_string_is_refused_and_never_logged(client, caplog, url, headers):
    caplog.set_level(logging.DEBUG)
    r = client.post(url, json={"texts": ["good"]}, headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    detail = r.json()["detail"]
    assert "query string" in detail and "Authorization: Bearer KEY" in detail
    assert KEY not in r.text
    server_log = "\n".join(rec.getMessage() for rec in caplog.records if not rec.name.startswith(("httpx", "httpcore")))
    assert "refused POST /v1/predict" in server_log  # (the test's HTTP client logs its own URL, query included)
    assert KEY not in server_log


@pytest.fixture
def restore_logging():
    """serve() configures logging (uvicorn's config): put the loggers back as they were for the other tests."""
    names = ["uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "fmtune", "fmtune.serving.serve"]
    saved = {n: (lg.handlers[:], lg.filters[:], lg.level, lg.propagate, lg.disabled) for n in names for lg in [logging.getLogger(n)]}
    yield
    for n, (handlers, filters, level, propagate, disabled) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:], lg.filters[:], lg.level, lg.propagate, lg.disabled = handlers, filters, level, propagate, disabled


def test_fmtune_serve_never_writes_a_query_string_to_its_logs(tiny_run, monkeypatch, capfd, restore_logging):
    """The real `fmtune serve` path (serve() -> uvicorn with serve's logging config) over real HTTP: uvicorn's access
    log shows each request's path but never its query string, so a key sent as ?api_key= is not written anywhere."""
    import socket

    import httpx
    import uvicorn
    from uvicorn.logging import AccessFormatter

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    access_lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            access_lines.append(self.format(record))

    servers: list = []

    def run_in_test(app, **kwargs):  # what uvicorn.run does, keeping the server so the test can stop it
        server = uvicorn.Server(uvicorn.Config(app, **kwargs))
        handler = Collect()
        handler.setFormatter(AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s', use_colors=False))
        logging.getLogger("uvicorn.access").addHandler(handler)  # after uvicorn.Config applied serve's log_config
        servers.append(server)
        server.run()

    monkeypatch.setattr(uvicorn, "run", run_in_test)
    thread = threading.Thread(target=serve, args=(tiny_run, ServeConfig(api_keys=[KEY], port=port)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (servers and servers[0].started) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers and servers[0].started, "fmtune serve did not start"
    try:
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base, timeout=30) as http:
            r = http.post(f"/v1/predict?api_key={KEY}", json={"texts": ["good"]}, headers=AUTH)
            assert r.status_code == 401 and "Authorization: Bearer KEY" in r.json()["detail"]
            assert http.get("/healthz?probe=query-value-31f7").status_code == 200  # any query: not logged
            assert http.post("/v1/predict", json={"texts": ["good"]}, headers=AUTH).status_code == 200
    finally:
        servers[0].should_exit = True
        thread.join(30)
    assert not thread.is_alive()
    out, err = capfd.readouterr()
    logged = "\n".join(access_lines) + out + err
    assert any('"POST /v1/predict HTTP/1.1" 401' in line for line in access_lines), access_lines  # requests were logged...
    assert any('"GET /healthz HTTP/1.1" 200' in line for line in access_lines), access_lines
    assert KEY not in logged and "query-value-31f7" not in logged and "?" not in "".join(access_lines)  # ...without their query


@pytest.mark.parametrize("body", [b'{"texts": ["ok private words \\ud83d"]}', b'{"texts": ["\\udc00 private words"]}',
                                  b'{"texts": "private words \\ud83d"}', b'{"texts": ["good"], "private words \\ud83d": 1}'])
def test_a_lone_surrogate_is_422_without_echo_or_traceback(body, caplog):
    caplog.set_level(logging.DEBUG)
    with TestClient(create_app(StubPredictor(), ServeConfig(api_keys=[KEY])), raise_server_exceptions=False) as c:
        r = c.post("/v1/predict", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert "private words" not in r.text and "input" not in r.json()["detail"][0]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]


def test_a_lone_surrogate_in_a_text_is_named(client):
    r = client.post("/v1/predict", content=b'{"texts": ["good", "ok \\ud83d"]}', headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"].startswith("texts[1] is not valid Unicode text: it holds a lone surrogate")


@pytest.mark.parametrize("blank", [" ", "   \t\n", "\u00a0\u3000"])
def test_a_whitespace_only_text_is_422_naming_the_item(client, blank):
    r = client.post("/v1/predict", json={"texts": ["good", blank]}, headers=AUTH)
    assert r.status_code == 422
    assert r.json()["detail"][0]["msg"] == "texts[1] is blank (only whitespace); every text needs at least one non-space character"
    assert client.post("/v1/predict", json={"texts": [" good "]}, headers=AUTH).status_code == 200


def test_generation_prompts_get_the_same_checks():
    with TestClient(create_app(EchoGenerator(), ServeConfig(api_keys=[KEY])), raise_server_exceptions=False) as c:
        r = c.post("/v1/generate", json={"prompts": ["a", "  "]}, headers=AUTH)
        assert r.status_code == 422
        assert r.json()["detail"][0]["msg"] == "prompts[1] is blank (only whitespace); every text needs at least one non-space character"
        r = c.post("/v1/generate", content=b'{"prompts": ["private words \\ud83d"]}', headers={**AUTH, "Content-Type": "application/json"})
        assert r.status_code == 422 and "private words" not in r.text
        assert r.json()["detail"][0]["msg"].startswith("prompts[0] is not valid Unicode text")
        assert c.post(f"/v1/generate?api_key={KEY}", json={"prompts": ["a"]}, headers=AUTH).status_code == 401
        assert c.post("/v1/generate", content=b"not json", headers={"Content-Type": "application/json"}).status_code == 401


@pytest.mark.parametrize("body, content_type", [
    (b"not json", "application/json"), (b'{"texts": [', "application/json"), (b'{"texts": ["ok \\ud83d"]}', "application/json"),
    (b"\xff\xfe\x00", "application/json"), (b"texts=good", "application/x-www-form-urlencoded"), (b"x" * 2000, "application/json"),
])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0123456789abcdef"}])
@pytest.mark.parametrize("path", ["/v1/predict", "/v1/generate"])
def test_without_a_valid_key_any_body_is_401(predictor, body, content_type, headers, path):
    """Authentication comes before the body is read: no key, no parsing (and no 413/422 telling what the body lacks)."""
    with TestClient(create_app(predictor, ServeConfig(api_keys=[KEY], max_body_bytes=1000)), raise_server_exceptions=False) as c:
        r = c.post(path, content=body, headers={**headers, "Content-Type": content_type})
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"


def test_public_pages_reveal_nothing_about_the_run():
    """/openapi.json and /docs need no key, so they say nothing of the run: /v1/model (with a key) does."""
    stub = SecretiveStub()
    with TestClient(create_app(stub, ServeConfig(api_keys=[KEY]))) as c:
        public = {path: c.get(path) for path in ("/openapi.json", "/docs", "/healthz")}
        assert c.get("/v1/model").status_code == 401
        assert c.get("/v1/model", headers=AUTH).json()["labels"] == stub.labels
        assert c.post("/v1/predict", json={"texts": ["x"]}, headers=AUTH).json()["predictions"][0]["label"] == "label-alpha-7f3"
    for path, r in public.items():
        assert r.status_code == 200, path
        for secret in ("run-name-5d2e", "label-alpha-7f3", "label-beta-9c1", "base-model-8a4b", "/srv/private"):
            assert secret not in r.text, (path, secret)


def test_no_served_page_loads_anything_from_another_host(predictor):
    """Every GET page (docs included) works offline: no scripts, styles or links to an external http(s) host."""
    import re

    app = create_app(predictor, ServeConfig(api_keys=[KEY]))
    pages = [route.path for route in app.routes if "GET" in getattr(route, "methods", ()) and "{" not in route.path]
    assert "/docs" in pages and "/openapi.json" in pages
    with TestClient(app) as c:
        for path in pages:
            r = c.get(path, headers=AUTH)
            assert r.status_code == 200, path
            assert not re.search(r"(https?:)?//[a-z0-9.-]+", r.text, re.IGNORECASE), (path, re.findall(r"(?:https?:)?//[^\s\"'<>]+", r.text))
        assert "/openapi.json" in c.get("/docs").text  # the docs page points to the full description
