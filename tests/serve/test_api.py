"""The HTTP API of `beit3 serve`, endpoint by endpoint, with tiny models and a tiny index."""
from __future__ import annotations

import argparse
import io
import json

import pytest
from PIL import Image

from beit3.pipelines import pipeline
from beit3.processing.image import load_image
from beit3.serve import config_from_args, register
from beit3.serve.app import ServeConfig, Server, create_app, is_loopback
from tests.faults import bomb_png
from tests.serve.conftest import CLASS_NAMES, COLOURS, SECRET, png_bytes, shape_picture
from tests.tiny_pipelines import bad_files

from fastapi.testclient import TestClient  # noqa: E402  (after the conftest's importorskip)


def make_client(world, **options) -> tuple[TestClient, Server]:
    models = options.pop("models", list(world["models"].values()))
    index = options.pop("index", world["index"])
    server = Server(ServeConfig(models=models, index=index, device="cpu", **options))
    return TestClient(create_app(server)), server


@pytest.fixture(scope="module")
def full(world):
    client, server = make_client(world, max_wait_ms=1)
    with client:
        yield client, server


@pytest.fixture(scope="module")
def client(full) -> TestClient:
    return full[0]


def upload(data: bytes, name: str = "image", filename: str = "picture.png") -> dict:
    return {name: (filename, data, "image/png")}


# ------------------------------------------------------------------------------------- answers
def test_health_names_every_loaded_task_and_the_index(client, world):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["auth"] is False and body["device"] == "cpu"
    assert set(body["tasks"]) == {"caption", "vqa", "classify", "nlvr2", "zero-shot"}
    assert body["tasks"]["caption"] == str(world["models"]["captioning"])
    assert body["index"] == {"images": 7}  # six pictures and the symlink


def test_caption_is_the_pipelines_caption(client, world, picture):
    response = client.post("/caption", files=upload(picture))
    assert response.status_code == 200
    expected = pipeline("captioning", world["models"]["captioning"], device="cpu")(load_image(picture))
    assert response.json() == expected and isinstance(expected["caption"], str)


def test_vqa_answers_the_question_with_top_k_scores(client, world, picture):
    response = client.post("/vqa", files=upload(picture), data={"question": "what colour is the circle?", "top_k": 3})
    assert response.status_code == 200
    body = response.json()
    expected = pipeline("vqa", world["models"]["vqa"], device="cpu")(load_image(picture), "what colour is the circle?",
                                                                      top_k=3)
    assert body["question"] == "what colour is the circle?"
    assert [a["answer"] for a in body["answers"]] == [a["answer"] for a in expected]
    assert [a["score"] for a in body["answers"]] == pytest.approx([a["score"] for a in expected], abs=1e-5)


def test_classify_scores_the_labels_of_the_folder(client, world, picture):
    body = client.post("/classify", files=upload(picture), data={"top_k": 4}).json()
    assert sorted(row["label"] for row in body["labels"]) == sorted(CLASS_NAMES)
    assert sum(row["score"] for row in body["labels"]) == pytest.approx(1.0, abs=1e-4)
    expected = pipeline("classification", world["models"]["classification"], device="cpu")(load_image(picture), top_k=2)
    two = client.post("/classify", files=upload(picture), data={"top_k": 2}).json()["labels"]
    assert [row["label"] for row in two] == [row["label"] for row in expected]


def test_nlvr2_judges_a_pair(client, world, picture):
    right = png_bytes(shape_picture(COLOURS["blue"], "square", 64))
    files = {"left": ("l.png", picture, "image/png"), "right": ("r.png", right, "image/png")}
    body = client.post("/nlvr2", files=files, data={"statement": "the left image shows a circle"}).json()
    expected = pipeline("nlvr2", world["models"]["nlvr2"], device="cpu")(
        (load_image(picture), load_image(right)), "the left image shows a circle")
    assert body["true"] == expected["true"] and body["probability"] == pytest.approx(expected["probability"], abs=1e-5)


def test_zero_shot_ranks_the_classes_given(client, world, picture):
    body = client.post("/zero-shot", files=upload(picture), data={"classes": "cat, dog , car,cat", "top_k": 5}).json()
    assert sorted(row["label"] for row in body["labels"]) == ["car", "cat", "dog"]  # duplicates dropped
    expected = pipeline("zero-shot", world["models"]["zero-shot"], device="cpu")(load_image(picture),
                                                                                 ["cat", "dog", "car"])
    assert [row["label"] for row in body["labels"]] == [row["label"] for row in expected]
    other = client.post("/zero-shot", files=upload(picture), data={"classes": "circle, square"}).json()
    assert sorted(row["label"] for row in other["labels"]) == ["circle", "square"]


def test_search_by_text_gives_hits_with_image_and_thumbnail_urls(client, world):
    body = client.get("/search", params={"q": "a red circle", "k": 3}).json()
    assert body["query"] == "a red circle" and len(body["hits"]) == 3
    hit = body["hits"][0]
    assert set(hit) == {"rank", "score", "id", "name", "image_url", "thumbnail_url"}
    assert hit["image_url"] == f"/image/{hit['id']}" and hit["thumbnail_url"] == f"/thumbnail/{hit['id']}"
    assert [h["rank"] for h in body["hits"]] == [1, 2, 3]
    assert body["hits"][0]["score"] >= body["hits"][1]["score"] >= body["hits"][2]["score"]
    assert "/" not in hit["name"] and str(world["root"]) not in json.dumps(body)  # no server paths
    posted = client.post("/search", data={"q": "a red circle", "k": 3}).json()
    assert [h["id"] for h in posted["hits"]] == [h["id"] for h in body["hits"]]


def test_search_by_an_indexed_image_finds_it_first(client, world):
    data = (world["photos"] / "blue_square.png").read_bytes()
    body = client.post("/search", files=upload(data, filename="blue_square.png"), data={"k": 2}).json()
    assert body["hits"][0]["name"] == "blue_square.png"
    assert body["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_image_and_thumbnail_serve_the_indexed_file(client, world):
    hits = client.get("/search", params={"q": "a square", "k": 7}).json()["hits"]
    hit = next(h for h in hits if h["name"] == "green_triangle.png")
    image = client.get(hit["image_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == (world["photos"] / "green_triangle.png").read_bytes()
    thumb = client.get(hit["thumbnail_url"], params={"size": 32})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    decoded = Image.open(io.BytesIO(thumb.content))
    assert decoded.format == "JPEG" and max(decoded.size) == 32
    assert client.get(hit["thumbnail_url"], params={"size": 32}).content == thumb.content  # the cached one
    assert client.get(hit["thumbnail_url"], params={"size": 5000}).status_code == 422


# ------------------------------------------------------------------------------------- pages
def test_the_page_its_files_and_the_api_docs_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert '<script src="/static/app.js">' in page.text and 'id="file"' in page.text
    assert "fetch(" in client.get("/static/app.js").text
    assert client.get("/static/style.css").status_code == 200
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/caption", "/vqa", "/classify", "/nlvr2", "/zero-shot", "/search", "/image/{image_id}",
            "/thumbnail/{image_id}", "/health", "/metrics"} <= set(paths)


def test_metrics_count_requests_latency_and_batches(full, picture):
    client, server = full
    before = client.get("/metrics").json()
    client.post("/caption", files=upload(picture))
    client.post("/caption", files=upload(b"not an image"))
    after = client.get("/metrics").json()
    caption = after["endpoints"]["/caption"]
    done = before["endpoints"].get("/caption", {"requests": 0, "by_status": {}})
    assert caption["requests"] == done["requests"] + 2
    assert caption["by_status"]["400"] == done["by_status"].get("400", 0) + 1
    assert 0 < caption["latency_ms"]["p50"] <= caption["latency_ms"]["p99"]
    model = after["models"]["caption"]
    assert model["calls"] == before["models"]["caption"]["calls"] + 1 and model["queue_length"] == 0
    assert sum(model["batch_sizes"].values()) == model["calls"] and model["max_batch"] == 8
    assert "/image/{image_id}" not in after["endpoints"] or all("/image/" + str(i) not in after["endpoints"]
                                                                 for i in range(7))


# ------------------------------------------------------------------------------------- bad input
def test_endpoints_of_tasks_not_loaded_answer_404_naming_the_option(world, picture):
    client, server = make_client(world, models=[world["models"]["classification"]], index=None)
    with client:
        for path, files, data in [("/caption", upload(picture), {}), ("/vqa", upload(picture), {"question": "what?"}),
                                  ("/zero-shot", upload(picture), {"classes": "a"})]:
            response = client.post(path, files=files, data=data)
            assert response.status_code == 404 and "--model" in response.json()["detail"], path
        left_right = {"left": ("l.png", picture, "image/png"), "right": ("r.png", picture, "image/png")}
        assert "--model" in client.post("/nlvr2", files=left_right, data={"statement": "x"}).json()["detail"]
        for response in (client.get("/search", params={"q": "x"}), client.get("/image/0"), client.get("/thumbnail/0")):
            assert response.status_code == 404 and "--index" in response.json()["detail"]
        assert client.post("/classify", files=upload(picture)).status_code == 200
        assert set(client.get("/health").json()["tasks"]) == {"classify"}


def test_uploads_that_are_not_images_are_refused_with_a_message(client, tmp_path):
    files = bad_files(tmp_path)
    for name, expect in [("text", "not an image"), ("empty", "empty"), ("corrupt", "cannot read")]:
        response = client.post("/caption", files=upload(files[name].read_bytes(), filename=files[name].name))
        assert response.status_code == 400, name
        assert expect in response.json()["detail"] and "image" in response.json()["detail"], name
    bomb = client.post("/classify", files=upload(files["huge"].read_bytes()))
    assert bomb.status_code == 413 and "decompression bomb" in bomb.json()["detail"]
    below_pil = bomb_png(tmp_path / "wide.png", 9000, 5000)  # 45 M pixels: PIL only warns, the server refuses
    refused = client.post("/classify", files=upload(below_pil.read_bytes()))
    assert refused.status_code == 413 and "9000x5000" in refused.json()["detail"]
    assert client.post("/search", files=upload(b"GIF89a nonsense")).status_code == 400


def test_missing_and_invalid_fields_are_4xx(client, picture):
    assert client.post("/caption").status_code == 422
    assert client.post("/vqa", files=upload(picture)).status_code == 422  # no question
    blank = client.post("/vqa", files=upload(picture), data={"question": "   "})
    assert blank.status_code == 400 and "empty" in blank.json()["detail"]
    assert client.post("/nlvr2", files=upload(picture, "left"), data={"statement": "x"}).status_code == 422
    assert client.post("/nlvr2", files={"left": ("l", picture), "right": ("r", picture)},
                       data={"statement": " "}).status_code == 400
    zero = client.post("/classify", files=upload(picture), data={"top_k": 0})
    assert zero.status_code == 400 and "top_k" in zero.json()["detail"]
    assert client.post("/zero-shot", files=upload(picture), data={"classes": " , "}).status_code == 400
    assert client.get("/search").status_code == 422
    assert client.get("/search", params={"q": " "}).status_code == 400
    assert client.post("/search", data={"k": 3}).status_code == 400


def test_uploads_over_the_limit_answer_413(world, picture):
    client, _ = make_client(world, models=[world["models"]["captioning"]], index=None, max_upload_mb=0.01)
    with client:
        big = png_bytes(Image.effect_noise((120, 120), 60).convert("RGB"))
        assert len(big) > 0.01 * 2**20
        response = client.post("/caption", files=upload(big))
        assert response.status_code == 413 and "--max-upload-mb" in response.json()["detail"]

        def chunks():  # no Content-Length: the limit is counted as the body arrives
            for start in range(0, len(big), 1024):
                yield big[start:start + 1024]

        streamed = client.post("/caption", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert streamed.status_code == 413
        assert client.post("/caption", files=upload(picture)).status_code == 200


def test_image_ids_are_numbers_of_the_index_never_paths(client, world):
    for attempt in ["..", "../outside/secret.png", "../../outside/secret.png"]:  # the client resolves the dots
        response = client.get(f"/image/{attempt}")
        assert SECRET not in response.content and "image/" not in response.headers["content-type"]
    attempts = ["%2E%2E", "%2E%2E%2Foutside%2Fsecret.png", "..%2F..%2Foutside%2Fsecret.png", "%2Fetc%2Fpasswd",
                str(world["outside"] / "secret.png").replace("/", "%2F"), "-1", "7", "99999", "1.0", "0x1", " 1"]
    for attempt in attempts:
        for endpoint in ("image", "thumbnail"):
            response = client.get(f"/{endpoint}/{attempt}")
            assert response.status_code == 404, (endpoint, attempt, response.status_code)
            assert SECRET not in response.content
    assert client.get("/image//etc/passwd").status_code == 404
    assert client.get("/image/" + str(world["outside"] / "secret.png")).status_code == 404


def test_a_symlink_out_of_the_indexed_folder_is_not_served(client, full, world):
    server = full[1]
    rows = [row for row, record in enumerate(server.index.records) if record.path.endswith("zz_link.png")]
    assert rows, "the symlink was indexed (it looks like a PNG inside the folder)"
    outside = (world["outside"] / "elsewhere.png").read_bytes()
    for endpoint in ("image", "thumbnail"):
        response = client.get(f"/{endpoint}/{rows[0]}")
        assert response.status_code == 403 and "outside the indexed folders" in response.json()["detail"]
        assert response.content != outside
    for row in range(len(server.index)):  # nothing outside is reachable through any id
        assert client.get(f"/image/{row}").content != outside


def test_the_api_key_is_required_when_set(world, picture, monkeypatch):
    client, _ = make_client(world, models=[world["models"]["captioning"]], api_key="s3cret")
    with client:
        refused = client.post("/caption", files=upload(picture))
        assert refused.status_code == 401 and "X-API-Key" in refused.json()["detail"]
        assert refused.headers["www-authenticate"] == "Bearer"
        assert client.post("/caption", files=upload(picture), headers={"X-API-Key": "wrong"}).status_code == 401
        assert client.post("/caption", files=upload(picture), headers={"X-API-Key": "s3cret"}).status_code == 200
        assert client.post("/caption", files=upload(picture),
                           headers={"Authorization": "Bearer s3cret"}).status_code == 200
        for path in ("/image/0", "/thumbnail/0", "/metrics"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"X-API-Key": "s3cret"}).status_code == 200, path
        assert client.get("/search", params={"q": "x"}, headers={"Authorization": "Basic s3cret"}).status_code == 401
        assert client.get("/").status_code == 200 and "s3cret" not in client.get("/").text  # the page asks for it
        assert client.get("/health").json()["auth"] is True
        assert client.get("/static/app.js").status_code == 200


def test_the_command_line_options_and_their_defaults(world, monkeypatch):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--model", "a", "--model", "b", "--index", "i", "--max-batch", "4"])
    monkeypatch.setenv("BEIT3_API_KEY", "from-env")
    config = config_from_args(args)
    assert config.models == ["a", "b"] and config.index == "i" and config.host == "127.0.0.1"
    assert (config.port, config.max_batch, config.max_wait_ms, config.queue_size, config.timeout_s) == (8000, 4, 10, 64, 30)
    assert config.api_key == "from-env" and config.max_upload_mb == 10 and config.device == "auto"
    assert config_from_args(parser.parse_args(["serve", "--api-key", "flag"])).api_key == "flag"
    with pytest.raises(ValueError, match="--max-batch"):
        config_from_args(parser.parse_args(["serve", "--max-batch", "0"]))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")


def test_folders_that_are_not_servable_models_are_refused_at_start(world):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Server(ServeConfig(models=[world["root"] / "tokenizer"], device="cpu"))
    with pytest.raises(ValueError, match="two captioning models"):
        Server(ServeConfig(models=[world["models"]["captioning"]] * 2, device="cpu"))
    with pytest.raises(ValueError, match="nothing to serve"):
        Server(ServeConfig(device="cpu"))
    with pytest.raises(FileNotFoundError, match="no index"):
        Server(ServeConfig(index=world["photos"], device="cpu"))
