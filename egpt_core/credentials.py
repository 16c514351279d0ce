"""What counts as a credential, in one place: configs refuse it, logs and run files mask it.

Two tests, applied together: a *name* test (an option or key named like ``key``, ``secret``,
``token``, ``password``, ``credential``, ``session``, ``connection_string``) and a *value* test
(connection strings with ``AccountKey=``/``SharedAccessSignature=``/``Password=``, URLs with a
password in their userinfo or a ``sig=`` in their query, PEM private keys), so a secret is caught
whatever the option is called.

``storage_options`` in a config may only hold non-secret settings (``endpoint_url``, ``profile``,
``client_kwargs.region_name``, ...) and, in Prefect runs, ``secret_block``: the *name* of a Prefect
Secret block whose value (fsspec options such as ``{"key": ..., "secret": ...}``) is merged in at run
time inside the worker's process (``egpt_core.fsio``), so credentials never become flow or task
parameters, run files or cache keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

#: an option named with one of these words holds a credential (case-insensitive substring)
SECRET_NAME_WORDS = ("key", "secret", "token", "password", "passwd", "credential", "session", "connection_string")
#: the storage option naming a Prefect Secret block with the credentials (resolved at run time)
SECRET_BLOCK_OPTION = "secret_block"
#: options that look secret by name but hold no credential
NOT_SECRET_NAMES = frozenset({SECRET_BLOCK_OPTION, "SSEKMSKeyId"})  # a KMS key *id* is no secret
_NOT_SECRET_LOWER = frozenset(n.lower() for n in NOT_SECRET_NAMES)

#: (pattern, replacement) pairs masking the secret part of a string value
_VALUE_MASKS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Azure / database connection strings: AccountKey=...; SharedAccessSignature=...; Password=...
    (re.compile(r"(?i)\b(AccountKey|SharedAccessKey|SharedAccessSignature|Password|Pwd)=([^;\s]+)"), r"\1=***"),
    # URL userinfo with a password: scheme://user:pass@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^/\s:@]+):([^/\s@]+)@"), r"\1:***@"),
    # SAS-signed URLs: ...?sv=...&sig=...
    (re.compile(r"(?i)([?&]sig=)([^&\s]+)"), r"\1***"),
    # PEM private keys
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.S), "***"),
)

#: JSON-Schema regexes (no inline flags: browsers and Python must both read them) for the server-side check
_NAME_PATTERN = "|".join("".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else re.escape(c) for c in w)
                         for w in SECRET_NAME_WORDS)
_VALUE_PATTERN = ("AccountKey=|SharedAccessKey=|SharedAccessSignature=|[Pp]assword=|://[^/\\s:@]+:[^/\\s@]+@|"
                  "[?&]sig=|PRIVATE KEY-----")


def is_secret_name(name: object) -> bool:
    """True when an option named ``name`` holds a credential (``secret_block`` does not: it is a name)."""
    lowered = str(name).lower()
    return lowered not in _NOT_SECRET_LOWER and any(w in lowered for w in SECRET_NAME_WORDS)


def mask_secret_values(text: str) -> str:
    """``text`` with the secret parts of connection strings, URLs and PEM keys replaced by '***'."""
    for pattern, replacement in _VALUE_MASKS:
        text = pattern.sub(replacement, text)
    return text


def has_secret_value(text: str) -> bool:
    return mask_secret_values(text) != text


def _entries(obj: Any, path: str = "", name: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, option name, value) of every entry of nested dicts/lists, containers included; a
    credential-named container is not descended into (it is a credential as a whole)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            sub = f"{path}.{k}" if path else str(k)
            yield sub, str(k), v
            if not is_secret_name(k):
                yield from _entries(v, sub, str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield f"{path}[{i}]", name, v
            yield from _entries(v, f"{path}[{i}]", name)


def _is_empty(value: Any) -> bool:
    return value is None or value is False or value == "" or value == {} or value == []


def credential_paths(options: dict[str, Any] | None) -> list[str]:
    """Where ``options`` hold a credential (paths like ``client_kwargs.aws_secret_access_key``; never values)."""
    return [path for path, name, value in _entries(options or {})
            if (is_secret_name(name) and not _is_empty(value) and not isinstance(value, list))
            or (isinstance(value, str) and has_secret_value(value))]


def refusal_message(paths: list[str], where: str = "storage_options") -> str:
    """Why options with credentials are refused (naming where, never the values), and what to do instead."""
    block = (f", or, for Prefect runs, a Prefect Secret block named in {where}.{SECRET_BLOCK_OPTION} "
             "(deployments/README.md, 'Credentials')") if where == "storage_options" else ""
    return (f"{where} hold credentials ({', '.join(paths)}), which would be kept in plain text (flow parameters, "
            f"Prefect's database, run files, shell history). Give them to the machine instead: the standard AWS "
            f"chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE in the "
            f"environment, an instance or pod role){block}. Non-secret settings such as endpoint_url, profile or "
            f"client_kwargs.region_name stay in {where}.")


def redact(obj: Any) -> Any:
    """A copy of (storage) options safe to log: credential-named entries become '***', the secret
    parts of any other string value are masked."""
    if isinstance(obj, dict):
        return {k: "***" if is_secret_name(k) and not _is_empty(v) else redact(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return mask_secret_values(obj)
    return obj


def redact_values(obj: Any) -> Any:
    """A copy of a config dump with the secret parts of its string values masked (URLs with a
    password, connection strings); names are not judged (``max_new_tokens`` is no token)."""
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact_values(v) for v in obj]
    return mask_secret_values(obj) if isinstance(obj, str) else obj


def secret_strings(options: dict[str, Any] | None) -> set[str]:
    """The literal secret strings inside ``options`` (for scrubbing log records)."""
    found = set()
    for _, name, value in _entries(options or {}):
        if is_secret_name(name):
            found.update(v for v in _strings(value) if len(v) >= 8)
        elif isinstance(value, str) and has_secret_value(value):
            found.update(_secret_parts(value))
    return found


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _secret_parts(text: str) -> set[str]:
    parts = set()
    for pattern, _ in _VALUE_MASKS:
        for m in pattern.finditer(text):
            part = m.group(m.lastindex) if m.lastindex else m.group(0)
            if len(part) >= 6:
                parts.add(part)
    return parts


def storage_options_json_schema() -> dict[str, Any]:
    """JSON Schema for ``storage_options`` that the Prefect server enforces (``enforce_parameter_schema``):
    a run whose options hold a credential is refused with 409 before it is stored. Two levels deep
    (``client_kwargs``); the config models check any depth."""
    names_ok = {"anyOf": [{"enum": sorted(NOT_SECRET_NAMES)}, {"not": {"pattern": _NAME_PATTERN}}]}
    secret_string = {"type": "string", "pattern": _VALUE_PATTERN}
    nested = {"type": "object", "propertyNames": names_ok, "additionalProperties": {"not": secret_string}}
    return {"propertyNames": names_ok,
            "additionalProperties": {"not": secret_string, "if": {"type": "object"}, "then": nested}}
