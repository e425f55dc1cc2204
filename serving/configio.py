"""Loading command configs, layered key by key: the command's own defaults (the root model's field defaults,
including a suite's own, such as a bench's rob28 threat model) < the ``--config`` YAML file < each ``--set
key=value``. Every layer is merged into the one below it leaf by leaf, so ``--set a.b=x`` changes ``a.b`` and
nothing else; the result is validated by the frozen pydantic root."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Type, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be loaded; the message says which key and why."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value) with the value parsed as YAML (numbers, lists, booleans, null)."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: Iterable[str]) -> dict:
    """Each ``key=value`` replaces one leaf of ``data`` (a copy). A scalar given for a key whose current value is
    a list becomes a one-element list (``eps=0.05`` for ``eps: [0.1]``); a mapping given for a section is merged
    into it key by key."""
    out = _deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {item}: {part!r} is not a section")
            node = child
        old = node.get(path[-1])
        if isinstance(old, list) and value is not None and not isinstance(value, (list, dict)):
            value = [value]
        node[path[-1]] = merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
    return out


def merge(base: Any, top: Any) -> Any:
    """``top`` over ``base``, mappings merged key by key (recursively); any other value of ``top`` replaces."""
    if isinstance(base, dict) and isinstance(top, dict):
        out = _deepcopy(base)
        for k, v in top.items():
            out[k] = merge(base.get(k), v) if k in base else _deepcopy(v)
        return out
    return _deepcopy(top)


def defaults_of(model: Type[BaseModel]) -> dict:
    """The root's resolved defaults as plain data (the bottom layer)."""
    return model().model_dump(mode="json")


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def load_config(model: Type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            raise ConfigError(f"{p} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        data = merge(defaults_of(model), loaded)
    else:
        data = defaults_of(model)
    data = _scalars_to_lists(model, apply_overrides(data, overrides))
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"invalid {model.__name__}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            lines.append(f"  {loc}: {err['msg']}{_key_hint(model, err)}")
        raise ConfigError("\n".join(lines)) from None


def _scalars_to_lists(model: Type[BaseModel], data: Any) -> Any:
    """A single value written for a key the model declares as a tuple or list (``Optional`` ones too, whose
    default None gives :func:`apply_overrides` no list to go by) becomes a one-element list."""
    import typing

    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        value = out[name]
        kinds = [field.annotation, *typing.get_args(field.annotation)]
        if any(typing.get_origin(k) in (tuple, list) for k in kinds):
            if value is not None and not isinstance(value, (list, tuple)):
                out[name] = [value]  # a mapping too: one attack written as {name: fgsm}
            continue
        sub = _model_of(field.annotation)
        if isinstance(value, dict) and sub is not None:
            out[name] = _scalars_to_lists(sub, value)
    return out


def _key_hint(model: Type[BaseModel], err: dict) -> str:
    """For an unknown key: the closest valid key and the valid keys at that level."""
    if err.get("type") != "extra_forbidden":
        return ""
    import difflib

    node: Any = model
    for part in err["loc"][:-1]:
        field = node.model_fields.get(part) if isinstance(node, type) and issubclass(node, BaseModel) else None
        node = _model_of(field.annotation) if field is not None else None
        if node is None:
            return ""
    valid = list(node.model_fields)
    close = difflib.get_close_matches(str(err["loc"][-1]), valid, n=1)
    if not close and str(err["loc"][-1]) == "server":
        close = ["workdir"] if "workdir" in valid else []
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint or ';'} valid keys here: {', '.join(valid)}"


def _model_of(annotation: Any) -> Any:
    """The pydantic model inside an annotation (``M``, ``Optional[M]``), or None."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
