"""Reading a run configuration: YAML/JSON files, ``--section.key value`` overrides, and the
typing of every value (booleans only true/false, numbers only numbers) with the key, the expected
type and the value in each error. The sections themselves are in :mod:`scalebio.llm.config`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from pathlib import Path

import yaml

from scalebio.llm.config import _SECTION_DEFAULTS, _SECTION_TYPES, Config, ConfigError


def _unknown(key: str, options) -> ConfigError:
    close = difflib.get_close_matches(key.split(".")[-1], list(options), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{key}: unknown key{hint}")


_BOOLEANS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False}
_EXPECTED = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
             dict: "a mapping", tuple: "a list", list: "a list"}


def _kinds(tp) -> tuple[list, bool]:
    """The types a field hint allows (``int | None`` -> ([int], True))."""
    args = typing.get_args(tp) or (tp,)
    return [a for a in args if a is not type(None)], type(None) in args


def _from_text(text: str, kinds: list, optional: bool, bad):
    """A command-line (or YAML-quoted) string parsed into one of ``kinds``."""
    word = text.strip().lower()
    if optional and word in ("null", "none", "~", ""):
        return None
    if bool in kinds:
        if word not in _BOOLEANS:
            raise bad()
        return _BOOLEANS[word]
    if int in kinds or float in kinds:
        try:
            return float(text)  # YAML 1.1 reads 1e-3 as a string
        except ValueError:
            raise bad() from None
    if set(kinds) & {dict, tuple, list}:
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise bad(f"not valid YAML ({' '.join(str(e).split())})") from None
    return text


def _coerce(value, tp, key: str):
    """``value`` as the field's type, or a ConfigError naming the key, the type and the value.

    Strict: booleans are only true/false (and YAML's yes/no/on/off), numbers only numbers (a
    string such as ``"1e-3"`` is parsed, ``"ten"`` or ``true`` is refused), integers only
    integral numbers; strings are parsed with YAML syntax for lists and mappings.
    """
    kinds, optional = _kinds(tp)
    want = " or ".join(_EXPECTED.get(k, getattr(k, "__name__", str(k))) for k in kinds)
    want += " or null" if optional else ""

    def bad(why: str | None = None) -> ConfigError:
        return ConfigError(f"{key}: {why or 'expected ' + want}, got {value!r}")

    if isinstance(value, str) and str not in kinds:
        value = _from_text(value, kinds, optional, bad)
    if value is None:
        if optional or not kinds:
            return None
        raise bad()
    if bool in kinds:
        if isinstance(value, bool):
            return value
        raise bad()
    if isinstance(value, bool) and kinds:  # YAML true is never a number, string or list
        raise bad()
    if int in kinds and float not in kinds:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad()
    if float in kinds:
        if isinstance(value, (int, float)):
            return float(value)
        raise bad()
    for kind, ok in ((str, (str,)), (dict, (dict,)), (tuple, (list, tuple)), (list, (list, tuple))):
        if kind in kinds:
            if isinstance(value, ok):
                return value
            raise bad()
    return value


def _typed(cls, value: dict, section: str) -> dict:
    hints = typing.get_type_hints(cls)
    return {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in value.items()}


def config_from_dict(raw: dict, source: str = "config") -> Config:
    """Build a validated :class:`Config` from nested dicts; ``source`` names the file in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    sections = {}
    for name, value in raw.items():
        if name not in _SECTION_TYPES:
            raise _unknown(name, _SECTION_TYPES)
        cls = _SECTION_TYPES[name]
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        for k in value:
            if k not in known:
                raise _unknown(f"{name}.{k}", known)
        value = {
            k: tuple(v) if isinstance(v, list) and k in ("sources", "validation") else v
            for k, v in _typed(cls, value, name).items()
        }
        try:
            sections[name] = cls(**{**_SECTION_DEFAULTS.get(name, {}), **value})
        except ConfigError:
            raise
        except (TypeError, ValueError) as e:  # a missing field, or LisaConfig's own checks
            raise ConfigError(f"{source}: section {name}: {e}") from None
    try:
        return Config(**sections)
    except TypeError as e:  # a required section left out (e.g. data) fails its own checks
        raise ConfigError(f"{source}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--section.key value`` pairs (``--lisa.enabled true``) onto a nested dict."""
    out = json.loads(json.dumps(raw))  # deep copy of plain data
    if len(overrides) % 2:
        raise ConfigError(f"overrides: expected --key value pairs, got {overrides!r}")
    for flag, value in zip(overrides[::2], overrides[1::2]):
        if not flag.startswith("--") or "." not in flag:
            raise ConfigError(f"overrides: expected --section.key, got {flag!r}")
        section, key = flag[2:].split(".", 1)
        if section not in _SECTION_TYPES:
            raise _unknown(section, _SECTION_TYPES)
        types = typing.get_type_hints(_SECTION_TYPES[section])
        if key not in types:
            raise _unknown(f"{section}.{key}", types)
        if not isinstance(out.setdefault(section, {}), dict):
            raise ConfigError(f"{section}: expected a mapping, got {out[section]!r}")
        out[section][key] = _coerce(value, types[key], f"{section}.{key}")
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, dict]:
    """Read a YAML/JSON file, apply overrides, validate. Returns (config, the raw merged dict)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML/JSON: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
                          f"{e.start})") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections (model, data, "
                          f"bilevel, ...), got {type(raw).__name__}")
    raw = apply_overrides(raw, overrides or [])
    base = p.parent
    data = raw.get("data")
    entries = []
    for key in ("sources", "validation"):
        if isinstance(data, dict) and isinstance(data.get(key), list):
            entries += data[key]
    for s in entries:
        if isinstance(s, dict) and isinstance(s.get("path"), str) \
                and not Path(s["path"]).is_absolute():
            s["path"] = str((base / s["path"]).resolve())  # paths are relative to the config file
    return config_from_dict(raw, str(p)), raw
