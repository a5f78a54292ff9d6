"""Config-loading helpers for `mmjobs.config`: one `ConfigError` listing every problem.

Kept apart so `mmjobs.config` stays a readable list of models. Everything here works on any
pydantic model class (reading YAML, parsing and applying ``--set`` overrides, turning
validation errors into messages), so per-stage configs get the same messages as recipes.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, Tag, TypeAdapter, ValidationError

from mmjobs.config_base import PROBLEMS_ERROR

CREDENTIAL_HINT = (
    "credentials are never read from recipe files; put them in the environment or a "
    "Kubernetes Secret (cluster.secrets names it)"
)

# Matched on the lower-cased key. `secret(?!s\b)` rejects `secret`, `client_secret` and
# `aws_secret_access_key` but lets `secrets` through: that mapping holds Secret *names*.
_CREDENTIAL_KEY = re.compile(
    r"secret(?!s\b)|passw(?:or)?d|token|api_?key|access_?key|credential|private_?key"
)
# Tokenizer vocabulary is not a credential: `max_new_tokens`, `pad_token`, `tokenizer`.
_TOKENIZER_WORDS = re.compile(
    r"tokens(?![a-z])|tokeniz[a-z]*|(?:pad|bos|eos|unk|sep|cls|mask|image|video|special)_token(?:_id)?"
)
_INPUT_REPR_MAX = 80


class ConfigError(Exception):
    """Every problem found in one config source, so the user fixes them in one pass.

    Attributes:
        source: what was loaded (a file path, or a label for in-memory data).
        errors: one human-readable line per problem, e.g. ``train.lr: got 'fast' — ...``.
    """

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = list(errors)
        super().__init__(source, self.errors)  # args match __init__, so it pickles

    def _message(self) -> str:
        n = len(self.errors)
        header = f"{self.source}: {n} error{'' if n == 1 else 's'}"
        return "\n".join([header, *(f"  {e}" for e in self.errors)])

    def __str__(self) -> str:
        return self._message()


def is_credential_key(key: str) -> bool:
    """True if a mapping key looks like it holds a credential (e.g. ``aws_secret_access_key``)."""
    normalized = _TOKENIZER_WORDS.sub("", key.lower().replace("-", "_"))
    return bool(_CREDENTIAL_KEY.search(normalized))


def names_a_variable(key: str | int) -> bool:
    """True for keys naming an environment variable that holds a credential (`api_key_env`,
    `key_env`): allowed, and their values are never echoed in errors."""
    return isinstance(key, str) and key.lower().endswith("_env")


def find_credential_keys(data: Any, path: tuple[str | int, ...] = ()) -> list[tuple]:
    """Paths of every credential-looking key in nested dicts/lists, in document order.

    Keys directly under a ``secrets`` mapping are not checked: by contract they name
    Kubernetes Secret objects (``cluster.secrets.s3: mmjobs-s3``); unknown ones still fail
    schema validation, and anything nested deeper is checked again. Nor are keys naming an
    environment variable (`names_a_variable`: ``api_key_env: VLLM_API_KEY``).
    """
    found: list[tuple] = []
    if isinstance(data, Mapping):
        for key, value in data.items():
            key_path = (*path, key)
            if isinstance(key, str) and is_credential_key(key) and not names_a_variable(key):
                found.append(key_path)
            elif key == "secrets" and isinstance(value, Mapping):
                for name, child in value.items():
                    found.extend(find_credential_keys(child, (*key_path, name)))
            else:
                found.extend(find_credential_keys(value, key_path))
    elif isinstance(data, list):
        for i, item in enumerate(data):
            found.extend(find_credential_keys(item, (*path, i)))
    return found


def dotted(loc: tuple[str | int, ...]) -> str:
    """``('train', 'lora', 'r')`` -> ``train.lora.r``; list indices render as ``[i]``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<top level>"


def _candidates(tp: Any) -> Iterator[Any]:
    """The concrete types behind Optional/Union/Annotated wrappers."""
    origin = get_origin(tp)
    if origin is Annotated:
        yield from _candidates(get_args(tp)[0])
    elif origin in (Union, types.UnionType):
        for arg in get_args(tp):
            yield from _candidates(arg)
    else:
        yield tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def tagged_members(tp: Any) -> dict[str, type[BaseModel]]:
    """`{tag: model}` of a discriminated union whose members are `Annotated[Model, Tag(t)]`
    (e.g. `mmjobs.train.methods.TrainConfig`: mode -> config class); empty for other types."""
    if get_origin(tp) is Annotated:
        return tagged_members(get_args(tp)[0])
    if get_origin(tp) not in (Union, types.UnionType):
        return {}
    members = {}
    for arg in get_args(tp):
        tags = [m.tag for m in getattr(arg, "__metadata__", ()) if isinstance(m, Tag)]
        if not tags or not _is_model(get_args(arg)[0]):
            return {}
        members[tags[0]] = get_args(arg)[0]
    return members


def _tag_key(tag: str, model: type[BaseModel]) -> str:
    """The field a member's tag comes from: the one whose only allowed value is the tag."""
    return next((name for name, info in model.model_fields.items()
                 if get_args(info.annotation) == (tag,)), "tag")


def validate_as(tp: Any, data: Any) -> Any:
    """Validate `data` as `tp`: a model class, or a type such as a discriminated union."""
    if _is_model(tp):
        return tp.model_validate(data)
    return TypeAdapter(tp).validate_python(data)


def field_names(tp: Any) -> list[str]:
    """The keys a mapping of type `tp` may have (every member's, for a union of models)."""
    names: dict[str, None] = {}
    for cand in _candidates(tp):
        if _is_model(cand):
            names.update(dict.fromkeys(cand.model_fields))
    return list(names)


def field_type_at(model_cls: Any, loc: tuple[str | int, ...]) -> Any:
    """The declared type at ``loc`` below ``model_cls``, or None if the path is not declared.

    Descends through model fields, Optional wrappers, union members, and list/dict element
    types; a union member's tag in ``loc`` (as pydantic puts it in error locations) selects
    that member.
    """
    tp: Any = model_cls
    for part in loc:
        members = tagged_members(tp)
        if isinstance(part, str) and part in members:
            tp = members[part]  # a member's tag in an error location
            continue
        nxt = None
        for cand in _candidates(tp):
            origin = get_origin(cand)
            if _is_model(cand) and isinstance(part, str) and part in cand.model_fields:
                nxt = cand.model_fields[part].annotation
            elif origin is list and isinstance(part, int):
                nxt = get_args(cand)[0]
            elif origin is dict and isinstance(part, str):
                nxt = get_args(cand)[1]
            if nxt is not None:
                break
        if nxt is None:
            return None
        tp = nxt
    return tp


def section_model(tp: Any) -> type[BaseModel] | None:
    """The pydantic model inside ``tp`` (e.g. ``DataConfig | None`` -> DataConfig), if any."""
    return next((c for c in _candidates(tp) if _is_model(c)), None)


def unknown_key_message(model_cls: type[BaseModel] | None, key: str) -> str:
    """``unknown key; did you mean 'lr'?`` or, with no close match, the allowed names.

    A model may list keys it no longer has in a class attribute ``RENAMED_KEYS`` ({old: new
    dotted key}); those get ``renamed: set <new> instead``. ``REMOVED_KEYS`` ({key: what to do
    instead}) explains keys that have no replacement in this section.
    """
    renamed = getattr(model_cls, "RENAMED_KEYS", None) or {}
    if key in renamed:
        return f"{key} was renamed: set {renamed[key]} instead"
    removed = getattr(model_cls, "REMOVED_KEYS", None) or {}
    if key in removed:
        return f"not a setting here: {removed[key]}"
    allowed = list(model_cls.model_fields) if model_cls else []
    # cutoff 0.5 (difflib's default is 0.6) so single-letter fields match: 'rnk' -> 'r'.
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.5)
    if close:
        return f"unknown key; did you mean '{close[0]}'?"
    return f"unknown key; allowed: {', '.join(allowed)}"


def describe_validation_error(
    model_cls: Any, err: Mapping[str, Any], *, hide_input: bool = False
) -> str:
    """The message part (after ``<path>: ``) for one entry of ``ValidationError.errors()``.

    ``hide_input`` replaces the offending value with ``<redacted>`` (it holds credentials).
    Inside a discriminated union (e.g. a train config chosen by `mode`), a key of another member
    reads ``not a setting of mode dpo (it is for ppo, grpo); remove it``.
    """
    loc = tuple(err["loc"])
    if err["type"] == "missing":
        return "required field missing"
    if err["type"] == "extra_forbidden":
        union = _innermost_union(model_cls, loc[:-1])
        if union is not None:
            key, tag, members, below = union
            others = [t for t, member in members.items()
                      if t != tag and field_type_at(member, (*below, loc[-1])) is not None]
            if others:
                return (f"not a setting of {key} {tag} (it is for {', '.join(others)}); "
                        "remove it")
        parent = section_model(field_type_at(model_cls, loc[:-1]))
        return unknown_key_message(parent, str(loc[-1]))
    if err["type"] == "union_tag_invalid":
        members = tagged_members(field_type_at(model_cls, loc))
        tag = (err.get("ctx") or {}).get("tag", err["input"])
        return f"got {tag!r} — choose one of {', '.join(members)}"
    shown = "<redacted>" if hide_input else repr(err["input"])
    if len(shown) > _INPUT_REPR_MAX:
        shown = shown[: _INPUT_REPR_MAX - 3] + "..."
    return f"got {shown} — {err['msg']}"


def _innermost_union(model_cls: Any, loc: tuple[str | int, ...]
                     ) -> tuple[str, str, dict[str, type[BaseModel]], tuple] | None:
    """For an error location inside a tagged union member: (tag key, tag, members, the path
    below the member), else None."""
    tp: Any = model_cls
    found = None
    for i, part in enumerate(loc):
        members = tagged_members(tp)
        if isinstance(part, str) and part in members:
            found = (_tag_key(part, members[part]), part, members, tuple(loc[i + 1:]))
        tp = field_type_at(tp, (part,))
        if tp is None:
            break
    return found


def clean_loc(model_cls: Any, loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    """``loc`` without the union tags pydantic inserts (``train.dpo.rl`` -> ``train.rl``)."""
    out: list[str | int] = []
    tp: Any = model_cls
    for part in loc:
        members = tagged_members(tp)
        if isinstance(part, str) and part in members:
            tp = members[part]
            continue
        out.append(part)
        tp = field_type_at(tp, (part,)) if tp is not None else None
    return tuple(out)


def _messages(model_cls: Any, err: Mapping[str, Any], hide: bool
              ) -> list[tuple[tuple[str | int, ...], str]]:
    """(clean location, message) pairs of one pydantic error: one per problem for a
    `config_problems` error, where the location names the setting to change."""
    loc = clean_loc(model_cls, tuple(err["loc"]))
    if err["type"] == PROBLEMS_ERROR:
        return [((*loc, *field.split(".")), message)
                for field, message in err["ctx"]["problems"]]
    if err["type"] == "union_tag_invalid":
        members = tagged_members(field_type_at(model_cls, tuple(err["loc"])))
        key = _tag_key(*next(iter(members.items()))) if members else "tag"
        return [((*loc, key), describe_validation_error(model_cls, err, hide_input=hide))]
    return [(loc, describe_validation_error(model_cls, err, hide_input=hide))]


def yaml_error_message(source: str, exc: yaml.YAMLError) -> str:
    """``<source>: invalid YAML at line L, column C: <problem>`` (1-based, like editors)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    if mark is None:
        return f"{source}: invalid YAML: {problem}"
    return f"{source}: invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"


def parse_override(model_cls: Any, text: str) -> tuple[tuple[str, ...], Any, str] | str:
    """Parse ``KEY=VALUE`` against the schema.

    Returns:
        ``(path, value, label)`` with label ``--set KEY=VALUE`` for messages, or a complete
        error line such as ``--set train.lrr=1: unknown key; did you mean 'lr'?``.
    """
    label = f"--set {text}"
    key, sep, raw = text.partition("=")
    path = tuple(part.strip() for part in key.split("."))
    if not sep or not all(path):
        return f"{label}: expected KEY=VALUE"
    # As in files: a key directly under `secrets` names a Secret, one ending in `_env` a
    # variable (find_credential_keys).
    if any(is_credential_key(part) and path[i - 1:i] != ("secrets",)
           and not names_a_variable(part) for i, part in enumerate(path)):
        return f"--set {key}=***: {CREDENTIAL_HINT}"  # never echo the value
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        return f"{label}: invalid YAML value: {getattr(exc, 'problem', None) or exc}"
    for i, part in enumerate(path):
        parent = field_type_at(model_cls, path[:i])
        if tagged_members(parent):
            break  # which keys exist depends on the member chosen: validation reports them
        parent_model = section_model(parent)
        if parent_model is None:
            if get_origin(parent) is dict:
                break  # free-form mapping such as cluster.node_selector: any key goes
            return f"{label}: {'.'.join(path[:i])} has no sub-keys"
        if part not in parent_model.model_fields:
            return f"{label}: {unknown_key_message(parent_model, part)}"
    return path, value, label


def apply_override(data: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    """Set ``data[path] = value``, creating missing (or null) sections on the way."""
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            # The file has a scalar where a section belongs; validation reports that, so
            # leave it in place rather than hide the file's mistake behind the override.
            return
        node = child
    node[path[-1]] = value


def read_yaml(path: Path, source: str) -> tuple[Any, list[str]]:
    """Parsed YAML and a list of read/parse errors (empty on success)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        return None, [f"{source}: cannot read file: {exc.strerror or exc}"]
    try:
        return yaml.safe_load(text), []
    except yaml.YAMLError as exc:
        return None, [yaml_error_message(source, exc)]


def validation_errors(
    model_cls: Any,
    data: dict[str, Any],
    overrides: list[tuple[int, tuple[str, ...], str]],
) -> list[tuple[int, str]]:
    """Credential keys plus pydantic errors as ``(origin, line)`` pairs.

    Args:
        model_cls: model (or discriminated union, see `validate_as`) to validate against.
        data: the file's data with overrides already applied.
        overrides: ``(index, path, label)`` of each applied override, in command-line order.

    Returns:
        One pair per problem; origin is -1 for the file, else the index of the override
        that set the offending value (its label then replaces the dotted path).
    """
    creds = find_credential_keys(data)

    def origin(loc: tuple, unknown_key: bool = False) -> tuple[int, str]:
        for i, path, label in reversed(overrides):  # the last override wins, as when applied
            if loc[: len(path)] == path:
                if any(c[: len(path)] == path for c in creds) or any(map(names_a_variable,
                                                                          path)):
                    label = label.split("=", 1)[0] + "=***"  # never echo credentials
                return i, label + (f" ({dotted(loc)})" if len(loc) > len(path) else "")
        for i, path, label in reversed(overrides if unknown_key else ()):
            # A key that does not belong here, which an override wrote inside
            # (`--set train.rl.kl_coef=1` for a mode without rl): named without the value.
            if path[: len(loc)] == loc:
                return i, f"{label.split('=', 1)[0]} ({dotted(loc)})"
        return -1, dotted(loc)

    out = [(idx, f"{label}: {CREDENTIAL_HINT}") for idx, label in map(origin, creds)]
    try:
        validate_as(model_cls, data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = clean_loc(model_cls, tuple(err["loc"]))
            if any(loc[: len(c)] == c for c in creds):
                continue  # already reported as a credential
            # An error above a credential (e.g. a mapping where a string belongs) would
            # print the mapping, credential included.
            hide = any(c[: len(loc)] == loc for c in creds) or any(map(names_a_variable, loc))
            for where, message in _messages(model_cls, err, hide):
                idx, label = origin(where, unknown_key=err["type"] == "extra_forbidden")
                out.append((idx, f"{label}: {message}"))
    return out
