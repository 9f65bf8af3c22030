"""Security over every route of the app (iterated from `app.routes`, so a new route cannot be
forgotten): authentication, every route's scope against every scope, admin-only routes,
tenant isolation, rate limits; keys never in logs; the dashboard's headers on every page;
checkpoints never unpickled."""

from __future__ import annotations

import base64
import logging
import pathlib
import pickle
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi import FastAPI
from fastapi.routing import RouteContext, iter_route_contexts
from fastapi.testclient import TestClient

from bit_core.checkpoint import WEIGHTS_FILE, load_model, load_training_state
from bit_core.weights import infer_npz_architecture
from service.app import create_app
from service.auth import SCOPES, USER_SCOPES, create_key
from service.dashboard.auth import api_session, page_session
from service.db.models import Job, Model
from service.db.session import session_scope
from service.deps import Scoped
from service.settings import Settings
from tests.dashboard.conftest import sign_in
from tests.factories import png, save_tiny_model, two_classes
from tests.reliability import figures
from tests.service.conftest import new_key, register_model, store_of, upload

# Routes anyone may call. Anything else answering without credentials fails the test.
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),  # Prometheus scrapes without a key: counts only, no tenant data
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/admin/login"),
    ("POST", "/admin/login"),  # answers the form again unless the key is an admin's
}
# The scope(s) each route needs: what a key must hold to call it. A route not listed here
# follows the rule of `expected_scopes`.
ROUTE_SCOPES = {
    ("POST", "/v1/datasets"): {"datasets:write"},
    ("POST", "/v1/datasets/{dataset_id}/images"): {"datasets:write"},
    ("GET", "/v1/datasets"): {"datasets:read"},
    ("GET", "/v1/datasets/{dataset_id}"): {"datasets:read"},
    ("DELETE", "/v1/datasets/{dataset_id}"): {"datasets:write"},
    ("DELETE", "/v1/datasets/{dataset_id}/images/{image_id}"): {"datasets:write"},
    ("GET", "/v1/datasets/{dataset_id}/versions"): {"datasets:read"},
    ("POST", "/v1/finetune"): {"jobs:write"},
    ("POST", "/v1/finetune/upload"): {"jobs:write", "datasets:write"},  # it makes a dataset
    ("GET", "/v1/jobs"): {"jobs:read"},
    ("GET", "/v1/jobs/{job_id}"): {"jobs:read"},
    ("GET", "/v1/jobs/{job_id}/events"): {"jobs:read"},
    ("POST", "/v1/jobs/{job_id}/cancel"): {"jobs:write"},
    ("POST", "/v1/jobs/{job_id}/retry"): {"jobs:write"},
    ("GET", "/v1/models"): {"models:read"},
    ("GET", "/v1/models/{model_id}"): {"models:read"},
    ("POST", "/v1/models/{model_id}/archive"): {"models:write"},
    ("DELETE", "/v1/models/{model_id}"): {"models:write"},
    ("POST", "/v1/models/{model_id}/unarchive"): {"models:write"},
    ("GET", "/v1/models/by-name/{name}"): {"models:read"},
    ("PUT", "/v1/models/by-name/{name}/aliases/{alias}"): {"models:write"},
    ("DELETE", "/v1/models/by-name/{name}/aliases/{alias}"): {"models:write"},
    # An evaluation is a job (it counts against the active-jobs quota) reading a model and a
    # dataset the caller sees; reading evaluations is reading the model.
    ("POST", "/v1/models/{model_id}/evaluations"): {"jobs:write"},
    ("GET", "/v1/base-models"): {"models:read"},
    ("POST", "/v1/predict"): {"predict"},
    ("GET", "/v1/quotas"): {"datasets:read"},  # a tenant's own limits and usage
    ("POST", "/v1/pretrain"): {"admin"},
    ("POST", "/v1/keys"): {"admin"},
    ("GET", "/v1/keys"): {"admin"},
    ("DELETE", "/v1/keys/{prefix}"): {"admin"},
}
RESOURCES = ("datasets", "jobs", "models")
# A valid body for routes that need one, so that a request reaches the id checks.
BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("PATCH", "/v1/datasets/{dataset_id}/images/{image_id}"): {"split": "val"},
    ("PUT", "/v1/models/by-name/{name}/aliases/{alias}"): {"version": 1},
}
PARAM = re.compile(r"\{(\w+)\}")


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"device": "cpu", "rate_limit_per_minute": 0})


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def endpoints(app: FastAPI) -> list[tuple[str, str, RouteContext]]:
    """(method, path template, route) of every HTTP route, HEAD aside, routers flattened."""
    found = [
        (method, route.path, route)
        for route in iter_route_contexts(app.routes)
        if route.path and route.methods
        for method in sorted(route.methods)
        if method != "HEAD"
    ]
    assert len(found) > 30, "the app's routes were not found"
    return found


def fill(path: str, ids: dict[str, int | str]) -> str:
    return PARAM.sub(lambda m: str(ids.get(m.group(1), 1)), path)


def dependency_calls(route: RouteContext) -> list[Any]:
    """Everything the route depends on, at any depth."""
    root = getattr(route, "dependant", None)
    stack, calls = list(root.dependencies) if root is not None else [], []
    while stack:
        dependant = stack.pop()
        calls.append(dependant.call)
        stack.extend(dependant.dependencies)
    return calls


def route_scopes(route: RouteContext) -> set[str]:
    """The scopes the route declares: those of the `Scoped` dependencies in its tree."""
    return {call.scope for call in dependency_calls(route) if isinstance(call, Scoped)}


def expected_scopes(method: str, path: str) -> set[str]:
    """The scope(s) a route should need: ROUTE_SCOPES', or by rule for a route not listed
    there: a resource's read scope to read it (GET), its write scope to change it; anything
    else is an admin route."""
    if (method, path) in ROUTE_SCOPES:
        return ROUTE_SCOPES[method, path]
    resource = path.split("/")[2]
    if resource in RESOURCES:
        return {f"{resource}:{'read' if method == 'GET' else 'write'}"}
    return {"admin"}


def scoped_key(settings: Settings, scopes: set[str], tenant: str = "acme") -> dict[str, str]:
    """A key holding exactly `scopes` (an admin key where they include `admin`)."""
    role = "admin" if "admin" in scopes else "user"
    with session_scope(settings.database_url) as session:
        return bearer(create_key(session, role=role, tenant=tenant, scopes=scopes))


def error_code(response: Any) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- authentication and roles ----------------------------------------------------------------


def test_every_route_but_the_public_ones_needs_credentials(
    app: FastAPI, client: TestClient
) -> None:
    wrong = []
    routes = endpoints(app)
    for method, path, _ in routes:
        response = client.request(method, fill(path, {}), follow_redirects=False)
        if (method, path) in PUBLIC:
            continue
        if path.startswith("/v1/"):
            ok = response.status_code == 401 and error_code(response) == "unauthenticated"
        elif path.startswith("/admin"):
            # Pages redirect to the login page, JSON answers 401, forms fail their CSRF check.
            location = response.headers.get("location", "")
            ok = (response.status_code == 303 and location.startswith("/admin/login")) or (
                response.status_code in (401, 403)
            )
        else:
            ok = False  # a route outside /v1 and /admin must be listed in PUBLIC
        if not ok:
            wrong.append(f"{method} {path}: {response.status_code} {response.text[:120]}")
    figures.add("security: routes checked without credentials", len(routes))
    assert not wrong, "\n".join(wrong)
    # A key that is not one, and a key in the wrong scheme, are refused too.
    assert error_code(client.get("/v1/models", headers=bearer("bit_nope"))) == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Basic Yjpj"}).status_code == 401


def test_every_route_declares_the_scope_it_needs(app: FastAPI) -> None:
    wrong, checked = [], 0
    for method, path, route in endpoints(app):
        if (method, path) in PUBLIC:
            continue
        checked += 1
        if path.startswith("/admin"):
            # The dashboard's routes take an admin session (an admin key's), not a key.
            sessions = {page_session, api_session} & set(dependency_calls(route))
            if not sessions or route_scopes(route):
                wrong.append(f"{method} {path}: no admin session dependency")
            continue
        declared, expected = route_scopes(route), expected_scopes(method, path)
        # A route not listed may be admin-only (never too open); a listed one is exact.
        admin_only_new = (method, path) not in ROUTE_SCOPES and declared == {"admin"}
        if declared != expected and not admin_only_new:
            wrong.append(f"{method} {path}: declares {sorted(declared)}, needs {sorted(expected)}")
    assert checked > 30
    assert not wrong, "\n".join(wrong)
    listed = {(m, p) for m, p, _ in endpoints(app)}
    assert set(ROUTE_SCOPES) <= listed, set(ROUTE_SCOPES) - listed  # the table is not stale


def test_every_route_against_every_scope(
    app: FastAPI, client: TestClient, settings: Settings
) -> None:
    routes = [
        (method, path, route_scopes(route))
        for method, path, route in endpoints(app)
        if path.startswith("/v1/") and (method, path) not in PUBLIC
    ]
    # One key per scope, holding only it; and one per route needing several, holding them all.
    keys = {frozenset([scope]): scoped_key(settings, {scope}) for scope in SCOPES}
    for _, _, needed in routes:
        if frozenset(needed) not in keys:
            keys[frozenset(needed)] = scoped_key(settings, needed)
    documented = app.openapi()["paths"]
    wrong, checked = [], 0
    for method, path, needed in routes:
        assert needed, f"{method} {path} declares no scope"
        forbidden_doc = documented[path][method.lower()]["responses"].get("403", {})
        forbidden_codes = set(
            forbidden_doc.get("content", {}).get("application/json", {}).get("examples", {})
        )
        for held, headers in keys.items():
            if len(held) > 1 and held != needed:
                continue  # a multi-scope key is for its own route
            checked += 1
            response = client.request(method, fill(path, {}), headers=headers)
            status, code = response.status_code, error_code(response)
            what = f"{method} {path} with {sorted(held)}: {status} {response.text[:120]}"
            if needed <= held:  # past the scope check: whatever the route answers, no 5xx
                if status >= 500 or code in ("insufficient_scope", "admin_required"):
                    wrong.append(what)
                continue
            expected = "admin_required" if "admin" in needed - held else "insufficient_scope"
            if (status, code) != (403, expected):
                wrong.append(what)
            elif code == "insufficient_scope" and response.json()["error"]["scope"] not in needed:
                wrong.append(f"{what} (names a scope the route does not need)")
            if code not in forbidden_codes:
                wrong.append(f"{method} {path}: 403 {code} is not in its documented responses")
    figures.add("scope checks (route × scope)", checked)
    assert checked >= len(routes) * len(SCOPES)
    assert not wrong, "\n".join(sorted(set(wrong)))


def test_admin_only_routes_refuse_user_keys(
    app: FastAPI, client: TestClient, settings: Settings
) -> None:
    admin_only = {(m, p) for m, p, route in endpoints(app) if "admin" in route_scopes(route)}
    assert {(m, p) for (m, p), scopes in ROUTE_SCOPES.items() if "admin" in scopes} <= admin_only
    user = scoped_key(settings, set(USER_SCOPES))  # every scope a user key may hold
    for method, path in sorted(admin_only):
        response = client.request(method, fill(path, {}), headers=user, json={})
        assert (response.status_code, error_code(response)) == (403, "admin_required"), path
    # Admin-only filters on shared routes are refused as well.
    response = client.get("/v1/models", params={"tenant": "globex"}, headers=user)
    assert (response.status_code, error_code(response)) == (403, "admin_required")


def test_another_tenants_ids_answer_404_on_every_route(
    app: FastAPI, client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    owner = bearer(new_key(settings, "user", "acme"))
    stranger = bearer(new_key(settings, "user", "globex"))
    dataset = upload(client, owner, two_classes()).json()["id"]
    save_tiny_model(tmp_path / "model")
    model = register_model(settings, tmp_path / "model", tenant="acme")
    with session_scope(settings.database_url) as session:
        job = Job(tenant="acme", kind="finetune", status="failed", base_model="R14x0.5")
        session.add(job)
        session.flush()
        job_id = job.id
    ids: dict[str, int | str] = {
        "dataset_id": dataset,
        "model_id": model,
        "job_id": job_id,
        "name": "shapes",  # the model's name; its alias is the owner's
        "alias": "production",
    }
    kinds = {"dataset_id": "dataset", "model_id": "model", "job_id": "job", "name": "model"}
    moved = client.put(
        "/v1/models/by-name/shapes/aliases/production", json={"version": 1}, headers=owner
    )
    assert moved.status_code == 200, moved.text
    wrong, checked = [], 0
    for method, path, route in endpoints(app):
        params = PARAM.findall(path)
        # Admin routes are no tenant's: a user key gets 403 there (test_admin_only_...).
        if not path.startswith("/v1/") or not params or "admin" in route_scopes(route):
            continue
        checked += 1
        body = BODIES.get((method, path))
        response = client.request(method, fill(path, ids), json=body, headers=stranger)
        expected = f"{kinds[params[0]]}_not_found"
        if (response.status_code, error_code(response)) != (404, expected):
            wrong.append(f"{method} {path}: {response.status_code} {response.text[:120]}")
    # Ids in bodies, too.
    image = base64.b64encode(png()).decode()
    for path, body, expected in (
        ("/v1/finetune", {"dataset_id": dataset}, "dataset_not_found"),
        ("/v1/predict", {"model_id": model, "images": [image]}, "model_not_found"),
        ("/v1/predict", {"model": "shapes@production", "images": [image]}, "model_not_found"),
    ):
        response = client.post(path, json=body, headers=stranger)
        if (response.status_code, error_code(response)) != (404, expected):
            wrong.append(f"POST {path} (body): {response.status_code} {response.text[:120]}")
    for listing in ("/v1/datasets", "/v1/jobs", "/v1/models"):
        assert client.get(listing, headers=stranger).json()["total"] == 0, listing
    figures.add("security: cross-tenant requests", checked + 3)
    assert checked >= 10 and not wrong, "\n".join(wrong)
    # Nothing of the owner's was touched by the stranger's deletes, cancels and retries.
    assert client.get(f"/v1/datasets/{dataset}", headers=owner).status_code == 200
    assert client.get(f"/v1/models/{model}", headers=owner).json()["status"] == "ready"
    assert client.get(f"/v1/jobs/{job_id}", headers=owner).json()["status"] == "failed"


def test_every_authenticated_route_is_rate_limited(settings: Settings) -> None:
    limited = settings.model_copy(update={"rate_limit_per_minute": 1, "rate_limit_burst": 1})
    app = create_app(limited)
    routes = [(m, p) for m, p, _ in endpoints(app) if p.startswith("/v1/")]
    with TestClient(app, raise_server_exceptions=False) as client:
        for method, path in routes:
            headers = bearer(new_key(limited, "admin", "acme"))  # a fresh bucket per route
            client.request(method, fill(path, {}), headers=headers)
            second = client.request(method, fill(path, {}), headers=headers)
            assert (second.status_code, error_code(second)) == (429, "rate_limited"), path
            assert int(second.headers["Retry-After"]) >= 1, path
    figures.add("security: routes rate limited", len(routes))


# --- secrets in logs -------------------------------------------------------------------------


def test_api_keys_never_appear_in_logs_or_answers(
    client: TestClient,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    user, admin = new_key(settings, "user", "acme"), new_key(settings, "admin", "acme")
    unknown = "bit_" + secrets.token_urlsafe(32)
    answers = []
    with caplog.at_level(logging.DEBUG):
        for key in (user, admin, unknown):
            answers += [
                client.get("/v1/datasets", headers=bearer(key)),
                client.get("/v1/models/999999", headers=bearer(key)),
                client.post("/v1/finetune", json={"dataset_id": "x"}, headers=bearer(key)),
                client.post("/v1/predict", content=b"{", headers=bearer(key)),
                client.get("/v1/jobs", headers={"Authorization": f"Basic {key}"}),
                client.get("/admin/login"),
            ]
        # The dashboard's login form, with a key that may not sign in and one that may.
        for key in (user, admin):
            token = re.search(r'name="login_token" value="([^"]+)"', answers[-1].text)
            assert token is not None
            answers.append(
                client.post(
                    "/admin/login",
                    data={"api_key": key, "login_token": token.group(1)},
                    follow_redirects=False,
                )
            )
    assert answers[-1].status_code == 303  # the admin key did sign in
    captured = capsys.readouterr()
    texts = [caplog.text, captured.out, captured.err, *(r.text for r in answers)]
    texts += [str(record.args) for record in caplog.records]
    texts += [str(dict(r.headers)) for r in answers]
    for key in (user, admin, unknown):
        secret = key[len("bit_") :]
        assert all(secret not in text for text in texts)
    assert len(caplog.records) > 0  # the requests were logged at all
    figures.add("security: requests checked for leaked keys", len(answers))


# --- the dashboard's headers -----------------------------------------------------------------


def test_every_dashboard_page_sends_strict_security_headers(
    app: FastAPI, client: TestClient, settings: Settings
) -> None:
    sign_in(client, new_key(settings, "admin", "acme"))
    pages = [p for m, p, _ in endpoints(app) if m == "GET" and p.startswith("/admin")]
    for path in pages:
        headers = client.get(fill(path, {}), follow_redirects=False).headers
        csp = headers.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, path
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, path
        assert headers.get("x-content-type-options") == "nosniff", path
        assert headers.get("x-frame-options") == "DENY", path
        assert headers.get("referrer-policy") in ("same-origin", "no-referrer", "strict-origin"), (
            path
        )
    figures.add("security: dashboard pages checked for headers", len(pages))


# --- checkpoints are never unpickled ---------------------------------------------------------


class PickleBomb:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (self.marker,))


def test_a_pickle_where_a_checkpoint_should_be_is_refused_without_running(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    proof = tmp_path / "the-bomb-works"
    pickle.loads(pickle.dumps(PickleBomb(proof)))
    assert proof.exists()  # the bomb is live: unpickling it does run code
    marker = tmp_path / "code-ran"
    bombs = {"pickle": pickle.dumps(PickleBomb(marker))}
    torch_file = tmp_path / "bomb.pt"
    torch.save(PickleBomb(marker), torch_file)
    bombs["torch.save"] = torch_file.read_bytes()
    headers = bearer(new_key(settings, "user", "acme"))
    save_tiny_model(tmp_path / "model")
    for kind, payload in bombs.items():
        # Through the API: a model whose weights file was replaced by the bomb.
        model_id = register_model(settings, tmp_path / "model")
        with session_scope(settings.database_url) as session:
            row = session.get(Model, model_id)
            assert row is not None
            directory = store_of(settings).path(row.uri)
        (directory / WEIGHTS_FILE).write_bytes(payload)
        files = {"files": ("a.png", png(), "image/png")}
        response = client.post(
            "/v1/predict", files=files, data={"model_id": str(model_id)}, headers=headers
        )
        assert error_code(response) == "model_corrupt", (kind, response.text)
        # The engine's loaders, with the integrity check off: still no unpickling.
        with pytest.raises(Exception):  # noqa: B017 (any refusal; only running code fails)
            load_model(directory, verify=False)
        (tmp_path / "state.safetensors").write_bytes(payload)
        with pytest.raises(ValueError):
            load_training_state(tmp_path / "state.safetensors")
        (tmp_path / "base.npz").write_bytes(payload)
        with pytest.raises(Exception):  # noqa: B017
            infer_npz_architecture(tmp_path / "base.npz")
    # An .npz whose array holds pickled objects: numpy is asked not to unpickle.
    np.savez(
        tmp_path / "objects.npz",
        **{"resnet/head/conv2d/kernel": np.array([PickleBomb(marker)], dtype=object)},
    )
    with pytest.raises(Exception):  # noqa: B017
        infer_npz_architecture(tmp_path / "objects.npz")
    assert not marker.exists()
    figures.add("security: pickle bombs refused", 2 * 4 + 1)
