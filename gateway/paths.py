"""Request-target normalization before service matching (pure).

Why: a prefix match on the raw path is not what an upstream serves. With one
service on `/a` and another on `/b`, `GET /a/../b/secret` would match `/a`
while an upstream that resolves dot segments serves `/b/secret`. So the
gateway matches, and forwards, the path an upstream will resolve: RFC 3986
§6.2.2 syntax-based normalization (§6.2.2.2 percent-encoded unreserved
characters decoded, §5.2.4 remove_dot_segments) plus merged empty segments,
as nginx does before it matches a location. The choices (see README "Paths"):

- `%2E` / `%2e` is an unreserved character (RFC 3986 §2.3) and so equivalent
  to `.`: it is decoded first, so `/%2e%2e/` is a dot segment like `/../`.
  Every other percent-encoded unreserved character (`%41` for `A`, `%7E` for
  `~`) is decoded too, so `/%61/x` matches the prefix `/a`.
- `%2F` (and every other encoded reserved or non-ASCII byte) stays encoded and
  is never a segment separator: RFC 3986 §2.2 makes an encoded delimiter data,
  and an upstream may give `a%2Fb` a meaning of its own (one segment).
- A path that climbs above the root (`/../x`, `/a/../../x`) is refused, not
  clamped as RFC 3986 §5.2.4 would: only a hostile or broken client sends one,
  and nginx refuses it too (400).
- Malformed percent-encoding (`%zz`, a trailing `%`) is refused (RFC 3986
  §2.1 requires two hex digits).

The query string is never touched.
"""

from __future__ import annotations

from typing import Final

# RFC 3986 §2.3 unreserved = ALPHA / DIGIT / "-" / "." / "_" / "~"
_UNRESERVED: Final = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")

ERR_ABOVE_ROOT: Final = "path climbs above the root"
ERR_PERCENT: Final = "malformed percent-encoding in path"
ERR_TARGET: Final = "unsupported request-target form"
ERR_AUTHORITY: Final = "bad authority in absolute-form request-target"


class BadTarget(Exception):
    """A request-target the gateway cannot normalize (answered with 400)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def needs_normalizing(path: bytes) -> bool:
    """The cheap check of the common case: no dot segment, no `//`, no `%`.

    Byte values (37 is `%`, 46 is `.`) on the left of `in`: a 1-byte string
    there costs CPython a raised and cleared TypeError per call.
    """
    return 37 in path or (46 in path and path.find(b"/.") >= 0) or path.find(b"//") >= 0


def _decode_unreserved(path: bytes) -> bytes:
    out = bytearray()
    i = 0
    n = len(path)
    while True:
        j = path.find(b"%", i)
        if j < 0:
            out += path[i:]
            return bytes(out)
        out += path[i:j]
        if j + 2 >= n or path[j + 1] not in _HEX or path[j + 2] not in _HEX:
            raise BadTarget(ERR_PERCENT)
        c = int(path[j + 1 : j + 3], 16)
        if c in _UNRESERVED:
            out.append(c)
        else:
            out += path[j : j + 3]
        i = j + 3


def normalize_path(path: bytes) -> bytes:
    """An absolute path (starts with `/`, no query) in normal form; raises BadTarget.

    Percent-encoded unreserved characters are decoded, empty segments merged
    and dot segments removed (RFC 3986 §6.2.2.2, §5.2.4); climbing above the
    root is refused.
    """
    if not needs_normalizing(path):
        return path
    if b"%" in path:
        path = _decode_unreserved(path)
    segs = path.split(b"/")
    last = len(segs) - 1
    out: list[bytes] = []
    for i in range(1, last + 1):
        seg = segs[i]
        if seg == b"..":
            if not out:
                raise BadTarget(ERR_ABOVE_ROOT)
            out.pop()
        elif seg and seg != b".":
            out.append(seg)
            continue
        if i == last:
            out.append(b"")  # a final "", "." or ".." leaves a trailing slash
    return b"/" + b"/".join(out)


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """(path, rest) where rest is "" or the "?query" part, untouched."""
    q = target.find(b"?")
    if q < 0:
        return target, b""
    return target[:q], target[q:]


def absolute_form(target: bytes) -> tuple[bytes, bytes]:
    """`http://host[:port]/p?q` -> (authority, origin-form "/p?q"); raises BadTarget.

    Why: RFC 9112 §3.2.2: a proxy that receives the absolute form uses the
    target's authority instead of Host, and the origin gets the origin form
    (an empty path becomes "/", RFC 9110 §4.2.3).
    """
    sep = target.find(b"://")
    if sep < 0 or target[:sep].lower() not in (b"http", b"https"):
        raise BadTarget(ERR_TARGET)
    rest = target[sep + 3 :]
    end = len(rest)
    for d in (b"/", b"?"):
        k = rest.find(d)
        if 0 <= k < end:
            end = k
    authority = rest[:end]
    if not authority or b"@" in authority or b"#" in authority:
        # userinfo is deprecated and a spoofing vector (RFC 9110 §4.2.4)
        raise BadTarget(ERR_AUTHORITY)
    origin = rest[end:]
    if not origin.startswith(b"/"):
        origin = b"/" + origin
    return authority, origin


def origin_target(method: bytes, target: bytes) -> tuple[bytes | None, bytes, bytes]:
    """(authority or None, normalized origin-form target, path to match on).

    Origin form is normalized; absolute form gives its authority and origin
    form (RFC 9112 §3.2.2); `*` is kept for OPTIONS (RFC 9112 §3.2.4, matched
    as "/"). Everything else (authority form outside CONNECT, garbage) raises
    BadTarget.
    """
    authority: bytes | None = None
    if not target.startswith(b"/"):
        if target == b"*" and method == b"OPTIONS":
            return None, target, b"/"
        authority, target = absolute_form(target)
    path, query = split_target(target)
    norm = normalize_path(path)
    if norm is not path:
        target = norm + query
    return authority, target, norm
