"""No accepted key is silently ignored. Every key the schema accepts is one of:

* a key with an effect: the engine reads it outside the config package (or in a config property that
  derives a value the engine reads), and a test names it;
* a key with one allowed value (``choices`` of one or deepspeed_keys.DEEPSPEED_ONLY_VALUES, doc starting
  "must be"): any other value is refused by name, so nothing is ignored;
* a documented no-op: its doc says "no effect: <why>" (the reason is what docs/config.md shows), for
  DeepSpeed keys whose only meaning is one Trident's design already has.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib
import typing

import pytest

from engine.config import TridentConfig
from engine.config.deepspeed_keys import DEEPSPEED_ONLY_VALUES

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG_DOC = (REPO / "docs" / "config.md").read_text(encoding="utf-8")
THIS = pathlib.Path(__file__).resolve()


def _section(tp):
    """The dataclass a field holds (directly, optionally, or as the items of a tuple), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    inner = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(inner) >= 1 and dataclasses.is_dataclass(inner[0]):
        return inner[0]
    return None


def accepted_keys(cls=TridentConfig, path: str = "") -> list[tuple[str, dataclasses.Field]]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        inner = _section(hints[f.name])
        if inner is not None:
            keys += accepted_keys(inner, key)
        else:
            keys.append((key, f))
    return keys


def _reads() -> set[str]:
    """Attribute names the engine reads outside engine/config, plus those read by config properties."""
    names = set()
    for path in (REPO / "engine").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_config = "config" in path.relative_to(REPO / "engine").parts[:1]
        scopes = (
            [tree]
            if not in_config
            else [
                fn
                for fn in ast.walk(tree)
                if isinstance(fn, ast.FunctionDef)
                and any(isinstance(d, ast.Name) and d.id == "property" for d in fn.decorator_list)
            ]
        )
        for scope in scopes:
            names |= {n.attr for n in ast.walk(scope) if isinstance(n, ast.Attribute)}
            # getattr(obj, "name") and the "name" string of a key path
            names |= {n.value for n in ast.walk(scope) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return names


READS = _reads()
TEST_TEXT = "\n".join(p.read_text(encoding="utf-8") for p in (REPO / "tests").rglob("*.py") if p.resolve() != THIS)


def _kind(key: str, field: dataclasses.Field) -> str:
    doc = field.metadata.get("doc", "")
    single = len(field.metadata.get("choices", ())) == 1 or key in DEEPSPEED_ONLY_VALUES
    if single and doc.startswith("must be"):
        return "fixed"
    if doc.startswith("no effect"):
        return "no-op"
    return "effect"


@pytest.mark.parametrize("key, field", accepted_keys(), ids=[k for k, _ in accepted_keys()])
def test_key_has_an_effect_or_a_documented_reason(key, field):
    kind = _kind(key, field)
    doc = field.metadata.get("doc", "")
    if kind == "no-op":
        reason = doc.partition(":")[2].strip()
        assert len(reason) >= 20, f"{key}: 'no effect' needs its reason in the doc, got {doc!r}"
        assert reason.split(";")[0][:40] in CONFIG_DOC.replace("\\|", "|"), f"{key}: docs/config.md is stale"
        return
    if kind == "fixed":
        return
    leaf = key.rsplit(".", 1)[-1]
    assert leaf in READS, (
        f"{key}: accepted but nothing in engine/ reads it (implement it, refuse it by name, or "
        "document 'no effect: <why>')"
    )
    assert leaf in TEST_TEXT or key in TEST_TEXT, f"{key}: has an effect but no test names it"
