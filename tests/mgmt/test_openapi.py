"""The OpenAPI description covers every route the daemon serves, and is consistent."""

from __future__ import annotations

import re
from typing import Any, cast

from mortar import __version__
from mortar.mgmt.api import ROUTES, make_app
from mortar.mgmt.daemon import Node
from mortar.mgmt.openapi import describe
from tests.integration.harness import Mortard


def _refs(obj: Any) -> list[str]:
    if isinstance(obj, dict):
        return [obj["$ref"]] if "$ref" in obj else [r for v in obj.values() for r in _refs(v)]
    if isinstance(obj, list):
        return [r for v in obj for r in _refs(v)]
    return []


def test_every_route_is_described() -> None:
    app = make_app(cast(Node, object()))
    doc = describe(ROUTES, __version__)
    served = {
        (r.method, r.resource.canonical)
        for r in app.router.routes()
        if r.resource is not None and r.method != "HEAD"
    }
    described = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert served == described
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["summary"] and op["operationId"] and "200" in op["responses"]
            names = {p["name"] for p in op.get("parameters", ()) if p["in"] == "path"}
            assert names == set(re.findall(r"{(\w+)}", path))
    ids = [op["operationId"] for ops in doc["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.removeprefix("#/components/schemas/") in schemas, ref


def test_daemon_serves_it(node: Mortard) -> None:
    doc = node.api("GET", "/v1/openapi.json")
    assert doc == describe(ROUTES, __version__)
    assert doc["openapi"].startswith("3.") and "/v1/volumes/{name}/volfile" in doc["paths"]
