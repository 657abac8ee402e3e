"""Which settings a command reads, found in its code, so its ``--help`` cannot drift.

What a function reads is every ``<name>.<field>`` of a Settings field in its
source, the fields of every Settings property or method it uses (``lease_ms``,
``twilio_credentials()``), and what each streamrec function it calls with a
parameter annotated ``Settings`` reads in turn. Keyword arguments built from
the settings are thereby followed into the components that take them; a
function handed no Settings reads none.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import types
from collections.abc import Callable
from functools import cache
from typing import Any

from streamrec.settings import Settings

Function = Callable[..., Any]


def variables_read(*roots: Function, follow: bool = True) -> list[str]:
    """The environment variables ``roots`` read, once each, in Settings' order.

    ``follow=False`` leaves out the functions the roots hand the settings to
    (their Settings properties and methods still count). Raises OSError or
    TypeError when a function's source is not available.
    """
    fields: set[str] = set()
    seen: set[Function] = set()
    todo = [inspect.unwrap(root) for root in roots]
    while todo:
        function = todo.pop()
        if function in seen:
            continue
        seen.add(function)
        found, members, callees = _reads(function)
        fields |= found
        todo += members
        todo += callees if follow else ()
    return [_variable(field) for field in Settings.model_fields if field in fields]


def _variable(field: str) -> str:
    alias = Settings.model_fields[field].validation_alias
    return alias if isinstance(alias, str) else field.upper()


@cache
def _reads(function: Function) -> tuple[frozenset[str], list[Function], list[Function]]:
    """What ``function``'s own source reads: fields, Settings members, functions handed
    the settings."""
    fields: set[str] = set()
    members: list[Function] = []
    callees: list[Function] = []
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(function)))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.attr in Settings.model_fields:
                fields.add(node.attr)
            elif (member := _settings_member(node.attr)) is not None:
                members.append(member)
        elif isinstance(node, ast.Call):
            callee = _resolve(node.func, function.__globals__)
            if callee is not None and _takes_settings(callee):
                callees.append(inspect.unwrap(callee))
    return frozenset(fields), members, callees


def _settings_member(name: str) -> Function | None:
    """The function behind Settings property or method ``name`` (None: not one)."""
    member = vars(Settings).get(name)
    if isinstance(member, property) and member.fget is not None:
        return member.fget
    return member if isinstance(member, types.FunctionType) else None


def _resolve(node: ast.expr, names: dict[str, Any]) -> Function | None:
    """The streamrec function a call's ``f`` or ``module.f`` names, if any."""
    if isinstance(node, ast.Name):
        found = names.get(node.id)
    elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        module = names.get(node.value.id)
        found = getattr(module, node.attr, None) if inspect.ismodule(module) else None
    else:
        return None
    inner = inspect.unwrap(found) if callable(found) else None
    if inspect.isfunction(inner) and inner.__module__.startswith("streamrec"):
        return inner
    return None


def _takes_settings(function: Function) -> bool:
    """Whether a parameter of ``function`` is annotated Settings."""
    parameters = inspect.signature(function).parameters.values()
    return any(p.annotation in (Settings, "Settings") for p in parameters)
