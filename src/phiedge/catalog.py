"""The Phi variants, chat formats, targets and recipes found on disk.

Nothing here lists a name by hand: every file under the data folders is discovered and validated
against schema.py, and all problems across all files are reported together.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from phiedge.errors import ConfigError, NotFoundError
from phiedge.schema import ChatFormat, Recipe, Target, Variant

M = TypeVar("M", bound=BaseModel)


def data_dir(kind: str) -> Path:
    """Where `targets/`, `recipes/` or `variants/` live: inside an installed wheel, else the source tree."""
    packaged = Path(__file__).parent / "_data" / kind
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / kind


def read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(str(path), [f"cannot read: {str(exc).splitlines()[0]}"]) from None
    if not isinstance(data, dict):
        raise ConfigError(str(path), ["expected a mapping at the top level"])
    return data


def pydantic_problems(exc: ValidationError) -> list[str]:
    return [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()]


def parse(model: type[M], data: dict, where: str) -> M:
    try:
        return model(**data)
    except ValidationError as exc:
        raise ConfigError(where, pydantic_problems(exc)) from None


def load_folder(folder: Path, model: type[M], *, recursive: bool = False) -> dict[str, M]:
    """Every `*.yaml` in folder, keyed by its path without suffix; all files' problems in one error."""
    found: dict[str, M] = {}
    problems: list[str] = []
    paths = sorted(folder.rglob("*.yaml") if recursive else folder.glob("*.yaml"))
    for path in paths:
        key = path.relative_to(folder).with_suffix("").as_posix()
        try:
            found[key] = parse(model, read_yaml(path), str(path))
        except ConfigError as exc:
            problems.extend(f"{path.name}: {p}" for p in exc.problems)
    if problems:
        raise ConfigError(str(folder), problems)
    return found


@lru_cache
def chat_formats() -> dict[str, ChatFormat]:
    return load_folder(data_dir("variants") / "chat_formats", ChatFormat)


@lru_cache
def variants() -> dict[str, Variant]:
    found = load_folder(data_dir("variants"), Variant)
    formats = chat_formats()
    problems = [f"{name}: unknown chat_format {v.chat_format!r}" for name, v in found.items()
                if v.chat_format and v.chat_format not in formats]
    problems += [f"{name}.yaml: name says {v.name!r}" for name, v in found.items() if name != v.name]
    if problems:
        raise ConfigError(str(data_dir("variants")), problems)
    return found


@lru_cache
def targets() -> dict[str, Target]:
    found = load_folder(data_dir("targets"), Target)
    problems = [f"{name}.yaml: name says {t.name!r}" for name, t in found.items() if name != t.name]
    problems += [f"{name}: recipe {t.recipe!r} not found under recipes/" for name, t in found.items()
                 if not (data_dir("recipes") / f"{t.recipe}.yaml").is_file()]
    if problems:
        raise ConfigError(str(data_dir("targets")), problems)
    return found


def recipe_path(name: str) -> Path:
    return data_dir("recipes") / f"{name}.yaml"


def recipes() -> dict[str, Recipe]:
    return load_folder(data_dir("recipes"), Recipe, recursive=True)


def load_recipe(name: str) -> dict:
    """The recipe as a plain dict (what Olive reads), after checking it against the schema."""
    path = recipe_path(name)
    if not path.is_file():
        raise NotFoundError(f"no recipe {name!r} (known: {', '.join(sorted(recipes()))})")
    data = read_yaml(path)
    parse(Recipe, data, str(path))
    return data


def _lookup(table: dict[str, M], name: str, what: str, aliases: dict[str, str] | None = None) -> M:
    key = name.strip()
    if key in table:
        return table[key]
    if aliases and key.lower() in aliases:
        return table[aliases[key.lower()]]
    raise NotFoundError(f"unknown {what} {name!r} (known: {', '.join(sorted(table))})")


def find_variant(name: str) -> Variant:
    table = variants()
    aliases = {a.lower(): v.name for v in table.values() for a in [v.hf_id, *v.aliases]}
    return _lookup(table, name, "variant", aliases)


def chat_format_of(variant: str | None) -> ChatFormat | None:
    """The chat format of a catalog variant (by name), or None for no variant or one without a format."""
    name = find_variant(variant).chat_format if variant else None
    return chat_formats()[name] if name else None


def find_target(name: str) -> Target:
    return _lookup(targets(), name, "target")


def architectures() -> tuple[set[str], dict[str, Variant]]:
    """(architectures phiedge builds, architecture -> a known variant phiedge cannot build yet)."""
    buildable = {a for v in variants().values() if v.buildable for a in v.config.get("architectures", [])}
    blocked = {a: v for v in variants().values() if not v.buildable for a in v.config.get("architectures", [])
               if a not in buildable}
    return buildable, blocked
