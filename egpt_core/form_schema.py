"""Optional settings (default ``None``) as Prefect's UI form shows them, without its 'Property is type
"None"' lines.

Pydantic writes ``x: int | None = None`` as ``{"anyOf": [{"type": "integer"}, {"type": "null"}],
"default": null}``; Prefect 3.9's (v2) UI renders every anyOf as tabs and the null tab, selected for a
null value, as the text 'Property is type "None"' (one per empty optional field, 16 in the pipeline's
form). Rewritten here, with what the server accepts unchanged:

- a plain value (string, number, list) keeps only its non-null branch and no ``default``: the UI shows
  an empty input and sends nothing when it stays empty (the model's default, ``None``, applies). The
  server still accepts an explicit ``null``: before validating it makes every optional property
  with a ``type`` and no ``default`` nullable (``prefect.utilities.schema_tools.validation``,
  ``_fix_null_typing``).
- a section (a nested model: "empty = skip") or a choice (an enum: the server's nullable rewrite would
  keep the enum, so null would fail it) keeps its tabs, the null one as ``{"const": null,
  "title": "None"}``: the UI draws nothing under that tab and sends a placeholder the server drops
  (``{"__prefect_kind": "json"}``, hydrated to "no value"), so the default applies; ``null`` itself
  is still valid against ``const``. Dropping the null branch there would let the UI prefill the
  section's own defaults, i.e. turn L6 or timing on.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import WithJsonSchema

#: the null branch of a section's tabs (the UI labels the tab "None" and draws nothing under it)
NONE_BRANCH: dict[str, Any] = {"const": None, "title": "None"}
_NULL = {"type": "null"}


def compact_optional_fields(properties: dict[str, dict[str, Any]]) -> None:
    """Rewrite, in place, the properties whose default is None as the module docstring says."""
    for name, prop in properties.items():
        branches = prop.get("anyOf")
        if not isinstance(branches, list) or _NULL not in branches or prop.get("default", ...) is not None:
            continue
        others = [b for b in branches if b != _NULL]
        if len(others) == 1 and "type" in others[0] and not {"$ref", "enum", "const"} & set(others[0]):
            rest = {k: v for k, v in prop.items() if k not in ("anyOf", "default")}
            properties[name] = {**others[0], **rest}
        else:
            prop["anyOf"] = [*others, dict(NONE_BRANCH)]


#: a flow parameter ``str | None = None`` (e.g. a deployment name; empty = none) as a form field without
#: the 'Property is type "None"' line (Prefect builds flow-level schemas itself, so the type carries it)
OptionalText = Annotated[str | None, WithJsonSchema({"anyOf": [{"type": "string"}, NONE_BRANCH]})]
