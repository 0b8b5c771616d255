"""Credentials masked out of what charnn prints and records: URLs with a user and password,
secrets named in query strings, headers, environment and config lines, and well-known key
formats.  Display only: what finds a document or a model by its URL uses the raw URL
(``charnn.storage.url_key``), since masking can make two URLs one string."""
from __future__ import annotations

import re

# What ``redact`` masks.  Conservative on purpose: a log line may lose some information, but
# never a secret.  A URL's userinfo is everything between "://" and the "@" before the host, even
# where the password holds "@", "/", "?" or "#" unencoded (which no URL parser reads as a
# password, but which users type and error messages echo).  Email addresses and "@" in a path
# (npm scopes, pkg@1.0) are left alone.  The names of query parameters, environment variables and
# config keys that hold secrets mask their values (name=VALUE, name: VALUE, "name": "VALUE").
_URL_TAIL = re.compile(r"(?<=://)(?:(?!://)[^\s\"<>])+")  # after "://", up to a blank, a quote or the next URL
_AUTHORITY_END = re.compile(r"[/?#]")
# Names whose value is a secret in "name: VALUE" (config lines, headers, JSON) ...
_COLON_NAMES = (r"access[_-]?token|refresh[_-]?token|session[_-]?token|security-token|token|client[_-]?secret"
                r"|secret[_-]?access[_-]?key|secret|password|passwd|passphrase|api[_-]?key|apikey|private[_-]?key|jwt")
# ... and in "name=VALUE" (query strings, environment, command lines), where a few more are clear;
# a bare "key=" only as a query parameter (?key=, &key=): elsewhere it is any key.
_EQUALS_NAMES = _COLON_NAMES + r"|id[_-]?token|pwd|credentials?|signature|sig|auth"


def _named_value(names: str, separator: str) -> "re.Pattern[str]":
    # The name alone or as the end of a longer one (AWS_SECRET_ACCESS_KEY, X-Amz-Signature), quoted
    # or not.  Lookbehinds, not a matched prefix: a prefix pattern backtracks quadratically on long words.
    return re.compile(rf"(?i)(?:(?<=[_.-])|(?<![A-Za-z0-9]))((?:{names})[\"']?\s*{separator}\s*[\"']?)"
                      r"[^&\s'\"]+")


_SECRETS = (
    (_named_value(_EQUALS_NAMES, "="), r"\1***"),
    (_named_value(_COLON_NAMES, ":"), r"\1***"),
    (re.compile(r"(?i)([?&;]key=)[^&\s'\"]+"), r"\1***"),
    # HTTP authorization: "Authorization: [scheme] VALUE"; "bearer VALUE" where VALUE looks like a token
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?(?:(?:basic|bearer|digest|token|negotiate)\s+)?)"
                r"[^\s'\",]+"), r"\1***"),
    (re.compile(r"(?i)\b(bearer\s+)(?=[A-Za-z._~+/-]*[0-9]|[A-Za-z0-9._~+/-]{20})[A-Za-z0-9._~+/-]+=*"), r"\1***"),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AKIA***"),  # AWS access key ids
    (re.compile(r"\bAIza[0-9A-Za-z_-]{35}\b"), "AIza***"),  # Google API keys
    (re.compile(r"\b(gh[pousr]_|github_pat_|hf_)[A-Za-z0-9_]{20,}"), r"\1***"),  # GitHub and Hugging Face tokens
    (re.compile(r"(?i)\b((?:set-)?cookie[\"']?\s*:\s*)[^\r\n\"']+"), r"\1***"),  # a Cookie header: every value
)
# Every text that ``redact`` changes matches this (an Arrow/RE2 regex): ``redact_urls`` skips the
# arrays that do not.  tests/test_secrets.py checks the two agree.
_MAY_HOLD_SECRETS = r"(?i)@|token|secret|passw|passphrase|pwd|key|credential|sig|auth|bearer|akia|asia|aiza|jwt|cookie|gh[pousr]_|github_pat_|hf_"


def _mask_userinfo(match: "re.Match[str]") -> str:
    rest = match.group()
    if "@" not in rest:
        return rest
    end = _AUTHORITY_END.search(rest)
    authority = rest[:end.start()] if end else rest
    if "@" in authority:  # user:password@host, the password possibly holding "@"
        return "***" + rest[authority.rindex("@"):]
    if ":" not in authority:  # host/path@...: an "@" in the path
        return rest
    # user:pa/ss@host: a password with "/", "?" or "#" ends the authority early; the host follows
    # the last "@" before the first "/", "?" or "#" after the first "@".
    first = rest.index("@")
    end = _AUTHORITY_END.search(rest, first)
    return "***" + rest[rest.rindex("@", 0, end.start() if end else len(rest)):]


def redact(text: str) -> str:
    """``text`` with credentials that URLs and keys can carry masked, for logs, errors and records."""
    text = _URL_TAIL.sub(_mask_userinfo, text)
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def redact_urls(urls):
    """An Arrow array of URLs with credentials masked; only the few that could hold any go
    through ``redact``, a chunk at a time."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(urls) == 0 or not pc.any(pc.match_substring_regex(urls, _MAY_HOLD_SECRETS)).as_py():
        return urls
    step = 65_536
    return pa.chunked_array([pa.array([redact(u) for u in urls.slice(i, step).to_pylist()], pa.string())
                             for i in range(0, len(urls), step)], pa.string())
