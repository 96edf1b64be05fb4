"""Syntax of the values a config file holds: host names, addresses, URLs, path prefixes.

Why a module of its own: `gateway check` must refuse what would later
misbehave (a host that can never match, a prefix that is not in the form
request paths are matched in, a port out of range), and the same rules serve
`config.build()` and any other reader. Every function is pure and returns
either the cleaned value or a message naming the real cause; the caller adds
the field path. User text in messages is quoted with `repr` so CR/LF and other
control characters never print raw.

The YAML loader refuses duplicate mapping keys: YAML 1.2 §3.2.1.1 requires
keys to be unique, but PyYAML keeps the last value silently.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, quote, urlsplit

import yaml

from gateway.paths import BadTarget, normalize_path

# RFC 1123 §2.1: letters, digits and hyphens; a label is 1-63 characters and
# neither starts nor ends with a hyphen; a name is at most 253 characters.
_LABEL_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$", re.IGNORECASE)
# RFC 3986 §3.3: what a path may hold unencoded (pchar and '/', plus '%' for escapes).
_PATH_CHARS_RE = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@/%]*$")
_PATH_SAFE = "/-._~!$&'()*+,;=:@%"
_ENCODED_SLASH_RE = re.compile(r"%2f|%5c", re.IGNORECASE)
_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PLAIN_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


def key_path(path: str, key: object) -> str:
    """`path.key`, with a key that is not a plain name quoted by repr (`path['a\\nb']`).

    Why: keys are user text; a name holding CR/LF or spaces must never print raw
    in an error line, and a quoted key cannot be mistaken for a nested path.
    """
    if isinstance(key, str) and _PLAIN_KEY_RE.match(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{key!r}]"


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def host_name_problem(name: str) -> str | None:
    """None when `name` is an IP literal or an RFC 1123 host name (one trailing dot allowed)."""
    if is_ip(name):
        return None
    bare = name[:-1] if name.endswith(".") else name
    if not bare:
        return f"{name!r} is not a host name"
    if len(bare) > 253:
        return f"{name[:40]!r}... is longer than 253 characters"
    for label in bare.split("."):
        if not _LABEL_RE.match(label):
            return (
                f"{name!r} is not a host name: each dot-separated label must be 1-63 letters, "
                f"digits or '-', not starting or ending with '-' (RFC 1123), or an IP address"
            )
    return None


def match_host(text: str) -> tuple[str, str | None]:
    """A `match.hosts` entry -> (the form requests are compared in, problem or None).

    Requests are matched on the Host header lower-cased, without port and
    trailing dot, IPv6 in brackets (RFC 9110 §7.2), so the configured name is
    brought to that form; a leading `*.` label matches any subdomain.
    """
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        if ":" in inner and is_ip(inner):
            return f"[{ipaddress.ip_address(inner).compressed}]", None
        return text, f"{text!r} is not an IPv6 address in brackets"
    if ":" in text:
        if is_ip(text):
            return f"[{ipaddress.ip_address(text).compressed}]", None
        return text, f"{text!r} has a port or a ':': hosts are matched without the port"
    if not text:
        return text, "is empty: leave hosts empty to match any host"
    wildcard = text.startswith("*.")
    name = text[2:] if wildcard else text
    if "*" in name or not name.strip("."):
        return text, (
            f"{text!r} is not a host name: a wildcard is one leading '*.' label followed "
            f"by a name (e.g. '*.example.com'); leave hosts empty to match any host"
        )
    problem = host_name_problem(name)
    if problem is not None:
        return text, problem
    if wildcard and is_ip(name):
        return text, f"{text!r}: a wildcard needs a host name after '*.', not an IP address"
    host = name.lower().rstrip(".")
    if is_ip(host):
        host = ipaddress.ip_address(host).compressed
    return ("*." + host if wildcard else host), None


def port_problem(text: str, *, allow_zero: bool) -> tuple[int, str | None]:
    """A port's digits -> (port, problem or None)."""
    low = 0 if allow_zero else 1
    hint = " (0 picks a free port)" if allow_zero else ""
    if not text.isascii() or not text.isdigit():
        return 0, f"port {text!r} is not a number"
    port = int(text)
    if not low <= port <= 65535:
        return port, f"port {port} is out of range {low}-65535{hint}"
    return port, None


def listen_address(value: object) -> tuple[str, int, str | None]:
    """A `host:port` listen address -> (host, port, problem or None).

    An empty host means every IPv4 address (`:8080` -> `0.0.0.0:8080`);
    IPv6 is written in brackets (`[::1]:8080`).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return "", 0, f'must be a "host:port" string, e.g. "0.0.0.0:{value}"'
    if not isinstance(value, str):
        return "", 0, f'must be a "host:port" string, not {value!r}'
    host, sep, port_text = value.rpartition(":")
    if not sep:
        return "", 0, f'{value!r} must be "host:port", e.g. "0.0.0.0:8080"'
    port, problem = port_problem(port_text, allow_zero=True)
    if problem is not None:
        return "", port, problem
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not (":" in host and is_ip(host)):
            return "", port, f"{value!r}: {host!r} is not an IPv6 address"
    elif ":" in host and not is_ip(host):
        return "", port, f'{value!r} must be "host:port" (IPv6 in brackets: "[::1]:8080")'
    host = host or "0.0.0.0"
    problem = host_name_problem(host)
    if problem is not None:
        return "", port, problem
    return host, port, None


def _split_url(value: str, schemes: tuple[str, ...]) -> tuple[SplitResult | None, str | None]:
    text = value if "://" in value else f"http://{value}"
    try:
        parts = urlsplit(text)
    except ValueError as e:
        return None, f"{value!r} is not a URL: {e}"
    if parts.scheme not in schemes:
        want = " or ".join(f"{s}://" for s in schemes)
        return None, f"{value!r}: the scheme must be {want}, not {parts.scheme + '://'!r}"
    if "@" in parts.netloc:
        return None, f"{value!r} must not hold user information ('user@')"
    if parts.query or parts.fragment or "?" in text or "#" in text:
        return None, f"{value!r} must not have a query or fragment"
    if parts.path not in ("", "/"):
        return None, f"{value!r} must not have a path ({parts.path!r})"
    host = parts.hostname
    if not host:
        return None, f"{value!r} has no host"
    netloc_host = parts.netloc.rpartition("]")[0][1:] if "]" in parts.netloc else None
    problem = host_name_problem(netloc_host if netloc_host is not None else host)
    if problem is not None:
        return None, problem
    rest = parts.netloc.rpartition("]")[2] if "]" in parts.netloc else parts.netloc
    if ":" in rest:
        port_text = rest.rpartition(":")[2]
        _, problem = port_problem(port_text, allow_zero=False)
        if problem is not None:
            return None, f"{value!r}: {problem}"
    return parts, None


def upstream_url(value: str) -> tuple[str, int, str | None]:
    """'http(s)://host:port' (or 'host:port') -> (host, port, problem or None).

    https:// is TLS to the upstream (README "TLS"), port 443 unless given.
    """
    parts, problem = _split_url(value, ("http", "https"))
    if parts is None:
        return "", 0, f"not an http(s)://host:port URL: {problem}"
    return str(parts.hostname), parts.port or (443 if parts.scheme == "https" else 80), None


def consul_address(value: str) -> tuple[str, str | None]:
    """A Consul HTTP API address -> (normalized URL, problem or None).

    Consul's CLI takes `host:port` or an `http(s)://` URI (Consul docs,
    "Commands: Environment variables", CONSUL_HTTP_ADDR); a bare address
    means http. Unix socket addresses are not supported here.
    """
    parts, problem = _split_url(value, ("http", "https"))
    if parts is None:
        return value, f"not an http(s)://host[:port] URL: {problem}"
    return (value if "://" in value else f"http://{value}").rstrip("/"), None


def path_prefix_problem(prefix: str) -> str | None:
    """None when `prefix` is an absolute path in the normal form requests are matched in.

    Refused: query or fragment, characters a request path cannot hold
    unencoded, percent-encoded '/' or '\\' (they are never separators), and
    dot segments, `//` or percent-encoded dots (the prefix would never match a
    normalized path; the message gives the normal form).
    """
    if not prefix.startswith("/"):
        return f"{prefix!r} must be a path starting with '/'"
    if "?" in prefix or "#" in prefix:
        return f"{prefix!r} must be a path without a query ('?') or fragment ('#')"
    if not _PATH_CHARS_RE.match(prefix):
        encoded = quote(prefix, safe=_PATH_SAFE)
        return (
            f"{prefix!r} holds characters a request path cannot carry unencoded "
            f"(RFC 3986 §3.3): write {encoded!r}"
        )
    if _BAD_ESCAPE_RE.search(prefix):
        return f"{prefix!r} has a '%' that is not followed by two hex digits (RFC 3986 §2.1)"
    if _ENCODED_SLASH_RE.search(prefix):
        return (
            f"{prefix!r} holds a percent-encoded '/' or '\\', which is never a path "
            f"separator: write the segments with '/'"
        )
    # The normal form is the one requests are matched in (gateway/paths.py), so a
    # prefix check passes is one a request can match.
    try:
        normal = normalize_path(prefix.encode("latin-1")).decode("latin-1")
    except BadTarget as e:
        return f"{prefix!r} cannot be normalized: {e.message}"
    if normal != prefix:
        return (
            f"{prefix!r} is not in normal form (dot segments, '//' or percent-encoded "
            f"unreserved characters; RFC 3986 §6.2.2, §5.2.4): write {normal!r}"
        )
    return None


# --------------------------------------------------------------------------- YAML


_MERGE_TAG = "tag:yaml.org,2002:merge"


# Nodes that aliases may add to a document beyond the ones it spells out (YAML 1.2
# §3.2.2.2: an alias stands for its anchored node, whole). Real configs reuse a block
# a few hundred times at most; nested aliases ("billion laughs") multiply instead:
# nine levels of ten make 10**9 values, and every check or error message that
# walks them takes minutes and gigabytes (go-yaml refuses "excessive aliasing" too).
MAX_ALIAS_NODES = 100_000


def _check_aliases(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand too far, or refer to a node they are inside."""
    sizes: dict[int, int] = {}  # node id -> its size with aliases expanded (each node once)

    def size(node: yaml.Node, inside: set[int]) -> int:
        key = id(node)
        known = sizes.get(key)
        if known is not None:
            return known
        if key in inside:
            raise yaml.MarkedYAMLError(
                problem="an alias refers to a node that contains it (a recursive document)",
                problem_mark=node.start_mark,
            )
        inside.add(key)
        n = 1
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [c for pair in node.value for c in pair]
        for child in children:
            n += size(child, inside)
        inside.discard(key)
        sizes[key] = n
        return n

    total = size(root, set())
    if total - len(sizes) > MAX_ALIAS_NODES:
        raise yaml.MarkedYAMLError(
            problem=f"aliases expand the document by more than {MAX_ALIAS_NODES:,} values; "
            "write the repeated parts out instead of nesting aliases",
            problem_mark=root.start_mark,
        )


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that records every duplicate mapping key with its path and lines.

    `load_yaml` refuses the document when any is found, so no value is
    silently replaced by a later one.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, str]] = []

    def construct_document(self, node: yaml.Node) -> object:
        _check_aliases(node)
        self._find_duplicates(node, "", set())
        return super().construct_document(node)

    def _find_duplicates(self, node: yaml.Node, path: str, seen_nodes: set[int]) -> None:
        if id(node) in seen_nodes:  # an alias: its node was walked where it was anchored
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._find_duplicates(item, f"{path}[{i}]", seen_nodes)
        elif isinstance(node, yaml.MappingNode):
            first: dict[object, int] = {}
            for key_node, value_node in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self._scalar_key(key_node)
                if key is None:
                    continue
                line = key_node.start_mark.line + 1
                sub = key_path(path, key)
                if key in first:
                    self.duplicates.append(
                        (
                            sub,
                            f"duplicate key {key!r} on line {line} (first on line "
                            f"{first[key]}): YAML would keep only the last one; remove one",
                        )
                    )
                else:
                    first[key] = line
                self._find_duplicates(value_node, sub, seen_nodes)

    def _scalar_key(self, node: yaml.Node) -> object:
        if not isinstance(node, yaml.ScalarNode):
            return None
        key: object = self.construct_object(node)
        try:
            hash(key)
        except TypeError:
            return None
        return key


def load_yaml(text: str) -> tuple[object, list[tuple[str, str]]]:
    """Parse one YAML document -> (data, duplicate keys as (path, message))."""
    loader = StrictLoader(text)
    try:
        data: object = loader.get_single_data()
    finally:
        loader.dispose()
    return data, loader.duplicates


def yaml_problem(e: yaml.YAMLError) -> str:
    """A parse error on one line, with line and column, without echoing the file's text."""
    if isinstance(e, yaml.reader.ReaderError):
        ch = chr(e.character) if isinstance(e.character, int) else e.character
        return f"not valid YAML at character {e.position}: {e.reason} ({ch!r})"
    if not isinstance(e, yaml.MarkedYAMLError) or e.problem_mark is None:
        return f"not valid YAML: {e}"
    mark = e.problem_mark
    text = f"not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {e.problem}"
    if e.context and e.context_mark is not None:
        cm = e.context_mark
        text += f" ({e.context} at line {cm.line + 1}, column {cm.column + 1})"
    return text
