"""docs/admin-api.md names exactly the operations of the OpenAPI document."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.openapi import build_openapi

DOC = Path(__file__).resolve().parent.parent / "docs" / "admin-api.md"
METHODS = ("get", "put", "post", "delete", "patch")


def documented() -> set[str]:
    text = DOC.read_text(encoding="utf-8")
    return set(re.findall(r"^### `([A-Z]+ /\S*)`$", text, re.M))


def in_openapi() -> set[str]:
    paths = build_openapi("test")["paths"]
    return {f"{m.upper()} {p}" for p, item in paths.items() for m in item if m in METHODS}


def test_every_openapi_operation_is_documented() -> None:
    missing = sorted(in_openapi() - documented())
    assert not missing, "docs/admin-api.md: add a section for each of these:\n" + "\n".join(
        f"### `{op}`\n\n<what it does, its body and answers>\n" for op in missing
    )


def test_every_documented_operation_exists() -> None:
    unknown = sorted(documented() - in_openapi())
    assert not unknown, (
        f"docs/admin-api.md documents operations gateway/openapi.py does not have: {unknown}; "
        "fix the heading, or add the route to the OpenAPI document"
    )


def test_the_doc_is_not_empty() -> None:
    assert len(documented()) >= 10


def test_each_weight_says_whether_it_is_raw_or_percent() -> None:
    """One meaning per endpoint, stated in the document a client generator reads."""
    doc = build_openapi("test")
    schemas = doc["components"]["schemas"]
    preview = doc["paths"]["/admin/services/{service}/preview"]["get"]
    assert "raw" in schemas["Weights"]["description"]
    assert "percent" in schemas["PlatformPayload"]["properties"]["gray_weight"]["description"]
    assert "percent" in schemas["RolloutStep"]["properties"]["weight"]["description"]
    assert "raw" in preview["description"] and "not percent" in preview["description"]
    text = DOC.read_text(encoding="utf-8")
    assert "**raw weight**" in text and "**percent**" in text
