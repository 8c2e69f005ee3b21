"""The OpenAPI document as the API really is: each route's JSON body (routes that read their
body themselves, after authentication, declare it with `body_doc`), the error statuses it can
answer with in the OpenAI envelope, and the two bearer schemes (API key, admin token), with
no 422 (validation errors are 400 here)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

_LOCAL_REF = "#/$defs/"
_COMPONENT_REF = "#/components/schemas/"


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose body is `model` (read by the route, not FastAPI)."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _hoist(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A body schema's `$defs` into the document's components, its own refs pointed there."""
    for name, sub in schema.pop("$defs", {}).items():
        components[name] = sub
    title = str(schema.get("title") or "Body")
    components[title] = schema
    return {"$ref": _COMPONENT_REF + title}


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for path_item in document.get("paths", {}).values():
            for operation in path_item.values():
                operation.get("responses", {}).pop("422", None)
                content = operation.get("requestBody", {}).get("content", {})
                body = content.get("application/json")
                if body and "$ref" not in body.get("schema", {}):  # declared with body_doc
                    body["schema"] = _hoist(body["schema"], components)
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        text = json.dumps(document).replace(f'"{_LOCAL_REF}', f'"{_COMPONENT_REF}')
        app.openapi_schema = json.loads(text)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
