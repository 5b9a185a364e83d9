"""/docs and /redoc name only this server's URLs, and each one answers (api/docs.py)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from api import docs
from api.app import create_app

# Where a page names a URL: <script src>, <link href>, Swagger UI's `url:` and ReDoc's spec-url.
_URL = re.compile(r"""(?:src|href|spec-url)="([^"]*)"|url: '([^']*)'""")
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
}


@pytest.fixture(scope="module")
def client() -> TestClient:
    # No Authorization header on any request: the pages are for anyone who can reach the API.
    return TestClient(create_app())


def _urls(html: str) -> list[str]:
    return [a or b for a, b in _URL.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_names_no_other_host(client: TestClient, page: str) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert "http://" not in response.text and "https://" not in response.text
    assert response.headers["content-security-policy"] == docs.CONTENT_SECURITY_POLICY
    urls = _urls(response.text)
    assert "/openapi.json" in urls
    assert docs.FAVICON in urls
    assert all(url.startswith("/") and not url.startswith("//") for url in urls), urls


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_every_url_a_docs_page_names_answers_with_its_type(client: TestClient, page: str) -> None:
    for url in _urls(client.get(page).text):
        response = client.get(url)
        assert response.status_code == 200, url
        suffix = url[url.rindex(".") :]
        assert response.headers["content-type"].startswith(_TYPES[suffix]), url
        assert len(response.content) > 1000, url


def test_pages_load_swagger_ui_and_redoc_from_the_package(client: TestClient) -> None:
    urls = _urls(client.get("/docs").text)
    assert docs.SWAGGER_JS in urls and docs.SWAGGER_CSS in urls
    assert docs.REDOC_JS in _urls(client.get("/redoc").text)


def test_oauth2_redirect_page_is_served_as_fastapi_would(client: TestClient) -> None:
    response = client.get("/docs/oauth2-redirect")
    assert response.status_code == 200
    assert "https://" not in response.text


def test_docs_routes_stay_out_of_the_openapi_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [path for path in paths if "doc" in path]
