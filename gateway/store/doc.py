"""The state document's bytes: canonical JSON, its checksum, encode and decode.

Why a checksum over canonical JSON: a torn, truncated or hand-mangled file
must be detected and never half-applied; the version makes every change
ordered so each process applies only newer documents. What a valid document
holds is decided in gateway/statedoc.py; this module only turns it into
bytes and back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import StateError
from gateway.statedoc import (
    EMPTY,
    FORMAT,
    GUARD_FIELDS,
    InvalidDoc,
    ServiceState,
    StateDoc,
    from_body,
    guard_problem,
    is_number,
    weight_problem,
)

__all__ = [
    "EMPTY",
    "FORMAT",
    "GUARD_FIELDS",
    "ServiceState",
    "StateDoc",
    "checksum",
    "decode",
    "encode",
    "guard_problem",
    "is_number",
    "weight_problem",
]


def _canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def checksum(body: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(_canonical(body)).hexdigest()


def encode(doc: StateDoc) -> bytes:
    """Pretty, sorted JSON with the checksum of the canonical form of everything else."""
    body = doc.body()
    out = {**body, "checksum": checksum(body)}
    return (json.dumps(out, sort_keys=True, indent=2, allow_nan=False) + "\n").encode()


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode(data: bytes, source: str = "<state>") -> StateDoc:
    """Parse, verify and validate a stored document; StateError naming the problem otherwise.

    A document whose checksum matches but which breaks a rule of
    gateway/statedoc.py is refused the same way as a corrupt one; the error's
    field is the path inside the document.
    """

    def bad(msg: str, field: str = "state") -> StateError:
        return StateError(f"{source}: corrupt state document: {msg}", field)

    try:
        raw = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"not valid JSON ({e}); the file may be truncated") from None
    if not isinstance(raw, dict):
        raise bad("top level is not an object")
    got = raw.pop("checksum", None)
    if not isinstance(got, str):
        raise bad("no checksum")
    try:
        want = checksum(raw)
    except (ValueError, TypeError, RecursionError) as e:  # e.g. an int too long to print
        raise bad(f"cannot be made canonical ({e})") from None
    if got != want:
        raise bad("checksum mismatch (edited or partially written)")
    try:
        return from_body(raw)
    except InvalidDoc as e:
        raise bad(f"{e.field} {e.reason}", e.field) from None
