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
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping, got {type(loaded).__name__}")
        data = merge(defaults_of(model), loaded)
    else:
        data = defaults_of(model)
    data = apply_overrides(data, overrides)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = [f"invalid {model.__name__}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "<root>"
            lines.append(f"  {loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
