"""Storage URLs without their secrets, for everything evomerge writes or prints.

A SQLAlchemy URL carries a password as ``user:PASSWORD@host``, or in its query
(``?password=...``, and the keyword form ``postgresql:///db?host=h&user=u&password=p``); libpq
also takes ``sslpassword``. Everything evomerge writes (run.json, logs, reports, the run
database) or prints (errors included) goes through :func:`redact` or :func:`scrub`. A SQLite URL
is a path, never credentials, even when the path contains ``@`` or ``:``.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, unquote

MASK = "***"
_SECRET_KEY = re.compile(r"pass|secret|token", re.IGNORECASE)


def _split(url: str) -> tuple[str, str, str, str]:
    """(scheme, authority, path, query) of a URL; authority is '' without one."""
    if "://" not in url:
        return "", "", url, ""
    scheme, rest = url.split("://", 1)
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    return scheme, authority, slash + path, query


def secrets_in(url: str) -> list[str]:
    """The secret values in a URL (raw and percent-decoded), longest first."""
    scheme, authority, _, query = _split(url)
    if scheme.startswith("sqlite"):
        return []
    found = []
    creds, at, _ = authority.rpartition("@")
    if at and ":" in creds:
        found.append(creds.split(":", 1)[1])
    for raw in query.split("&"):
        key, eq, value = raw.partition("=")
        if eq and value and _SECRET_KEY.search(unquote(key)):
            found.append(value)
    out = {s for v in found for s in (v, unquote(v), quote(unquote(v), safe="")) if s}
    return sorted(out, key=len, reverse=True)


def redact(url: str) -> str:
    """The URL with every secret replaced by ``***``."""
    scheme, authority, path, query = _split(url)
    if not scheme or scheme.startswith("sqlite"):
        return url
    creds, at, host = authority.rpartition("@")
    if at and ":" in creds:
        authority = f"{creds.split(':', 1)[0]}:{MASK}@{host}"
    if query:
        parts = []
        for key, value in parse_qsl(query, keep_blank_values=True):
            parts.append(f"{key}={MASK if value and _SECRET_KEY.search(key) else quote(value, safe='/:@,')}")
        query = "&".join(parts)
    return f"{scheme}://{authority}{path}" + (f"?{query}" if query else "")


def scrub(text: str, url: str) -> str:
    """``text`` (an error message, say) with the URL's secrets replaced by ``***``."""
    for secret in secrets_in(url):
        text = text.replace(secret, MASK)
    return text


def has_secret(url: str) -> bool:
    return bool(secrets_in(url))
