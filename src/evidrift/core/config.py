"""The config base: ``Section`` (pydantic, unknown keys forbidden), ``ConfigError``, and the validation
that turns pydantic's errors into messages naming each wrong key by its dotted path, the value given and what
is allowed (``validate_model``). The sections themselves live with their owners (``data.config``,
``classifier.config``, ``studies.*.config``); ``studies.config`` composes them into study.yaml."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from evidrift.core.errors import EvidriftError


class ConfigError(EvidriftError, ValueError):
    """A study file that cannot be used; the message names the file, the keys and the fix."""


ModelT = TypeVar("ModelT", bound=BaseModel)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _section_model(root: type[BaseModel], parts: list[str]) -> type[BaseModel] | None:
    """The pydantic model holding the key at dotted path ``parts`` (list indices skipped), or None."""
    import typing

    model: type[BaseModel] = root
    for part in parts[:-1]:
        if part.isdigit() or part not in model.model_fields:
            continue
        stack, found = [model.model_fields[part].annotation], None
        while stack and found is None:
            candidate = stack.pop()
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                found = candidate
            else:
                stack.extend(typing.get_args(candidate))
        if found is None:
            return None
        model = found
    return model


def _describe_unknown_key(root: type[BaseModel], location: str, parts: list[str]) -> str:
    """``a.b.typo: unknown key; did you mean 'key'? (allowed: k1, k2, ...)``."""
    import difflib

    model = _section_model(root, parts)
    if model is None:
        return f"{location}: unknown key (check the spelling; `evidrift validate` prints every valid key)"
    keys = list(model.model_fields)
    close = difflib.get_close_matches(parts[-1], keys, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"{location}: unknown key; {hint}(allowed: {', '.join(keys)})"


def _describe_error(root: type[BaseModel], error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"]) or "(top level)"
    given = error.get("input")
    message = error["msg"]
    allowed = (error.get("ctx") or {}).get("expected")
    if error["type"] == "extra_forbidden":
        return _describe_unknown_key(root, location, [str(part) for part in error["loc"]])
    text = f"{location}: {message}"
    if allowed:
        text += f" (allowed: {allowed})"
    if given is not None and not isinstance(given, dict | list):
        text += f"; got {given!r}"
    return text


def validate_model(root: type[ModelT], raw: dict[str, Any] | None, source: str, what: str) -> ModelT:
    """``root`` validated from ``raw``; raises ``ConfigError`` listing every wrong key of ``source``
    (``what``: the kind of file, e.g. "study file")."""
    try:
        return root.model_validate(raw or {})
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe_error(root, dict(e))}" for e in exc.errors())
        raise ConfigError(f"{source} is not a valid {what}:\n{lines}") from None
