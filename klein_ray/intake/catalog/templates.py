"""The catalog's templates: Jinja2 in its immutable sandbox, with strict undefined variables.

Templates come from the catalog file only: product values and scenes are data, never compiled,
so a product title holding ``{{ ... }}`` is written as it is. The sandbox refuses attribute
access to Python internals (``__class__``, ``__globals__``, ...) and calls that mutate; this
module turns that refusal, an undefined variable or a syntax error into a ``TemplateProblem``
the expander reports with the template's key and the product row. What stays out on purpose:
the ``random`` filter and ``lipsum`` (a catalog must expand the same every time), and string or
list repetition past ``MAX_REPEAT`` (``"a" * 10**9`` would take the machine's memory).

Each template knows the variables it reads, which sets the loop it is rendered in: once for
the catalog, once per product, per product and scene, or per row; a prompt that names no seed is
rendered once for all of a scene's seeds. A template of text and variables only
(``{{ product.sku }}-{{ seed }}``, the usual id) is joined directly, without Jinja's per-call
context; anything else, and any key it cannot find, goes through Jinja.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, nodes
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.meta import find_undeclared_variables
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_REPEAT = 100_000  # the longest string or list `*` may make
MAX_RENDERED = 65_536  # the most characters one rendered value may have

# The template variables, by the loop that sets them (docs/catalog.md lists them).
CATALOG, PRODUCT, SCENE, ROW = 0, 1, 2, 3
VARIABLES = {"vars": CATALOG, "product": PRODUCT, "product_index": PRODUCT, "scene": SCENE,
             "scene_index": SCENE, "seed": ROW, "seed_value": ROW}


class TemplateProblem(Exception):
    """A template that cannot be compiled or rendered; the message is the reason alone."""


class Columns(dict):
    """A mapping the templates read (a product row, a scene, ``vars``): ``x.name`` is its key
    ``name`` and nothing else (a column called ``items`` or ``values`` is not a dict method), and
    a missing key says which mapping lacks it."""

    __slots__ = ("label", "noun")

    def __init__(self, values: dict[str, Any], label: str, noun: str = "key"):
        super().__init__(values)
        self.label, self.noun = label, noun


class _Undefined(StrictUndefined):
    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        obj = self._undefined_obj
        if isinstance(obj, Columns) and not self._undefined_hint:
            have = ", ".join(sorted(obj)) or "none"
            return f"{obj.label} has no {obj.noun} {self._undefined_name!r} (it has: {have})"
        return str(super()._undefined_message)


class CatalogEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox the catalog's templates run in."""

    intercepted_binops = frozenset({"*", "**"})

    def __init__(self) -> None:
        super().__init__(undefined=_Undefined, autoescape=False, keep_trailing_newline=False,
                         finalize=_finalize)
        self.filters.pop("random", None)
        self.globals.pop("lipsum", None)

    def getattr(self, obj: Any, attribute: str) -> Any:
        if isinstance(obj, Columns):
            return self._column(obj, attribute)
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        if isinstance(obj, Columns):
            return self._column(obj, argument)
        return super().getitem(obj, argument)

    def _column(self, obj: Columns, name: Any) -> Any:
        if name in obj:
            return obj[name]
        if isinstance(name, str) and name.startswith("_"):  # said as the sandbox says it
            return self.unsafe_undefined(obj, name)
        return self.undefined(obj=obj, name=name)

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**":
            if isinstance(right, int) and abs(right) > 1024:
                raise SecurityError(f"exponent {right} is too large (at most 1024)")
            return operator.pow(left, right)
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int) and len(seq) * times > MAX_REPEAT:
                raise SecurityError(f"repeating a value {times:,} times makes more than {MAX_REPEAT:,} items")
        return operator.mul(left, right)


def _finalize(value: Any) -> Any:
    """A null product value (an empty Parquet cell, a JSON null) renders as nothing, never as
    'None': a missing second photo drops that reference."""
    return "" if value is None else value


@dataclass(frozen=True)
class Template:
    """One catalog key's value: a plain value, or a compiled template and the loop it is
    rendered in (``level``)."""

    key: str  # as the user wrote it: "prompt", "references[1]", "columns.sku"
    source: Any
    level: int
    compiled: Any = None  # jinja2.Template; None: a plain value
    expression: bool = False  # `when`: evaluated to a value, not rendered to text
    # A template of text and variables only ("{{ product.sku }}-{{ seed }}"): its parts, text
    # or (variable, keys), joined without Jinja's machinery (see ``_simple``).
    simple: tuple | None = None

    @property
    def plain(self) -> bool:
        return self.compiled is None

    def render(self, context: dict[str, Any]) -> Any:
        """Text (stripped), the value of an expression, or the plain value; TemplateProblem
        naming the reason when it fails."""
        if self.compiled is None:
            return self.source
        if self.simple is not None:
            text = self._join(context)
            if text is not None:
                return text.strip()
        try:
            if self.expression:
                return self.compiled(**context)
            # Template.render, without merging the globals into a new chain of mappings per call
            # (most of its cost): the context already holds them (Compiler.context).
            compiled = self.compiled
            state = Context(compiled.environment, context, compiled.name, compiled.blocks)
            text = "".join(compiled.root_render_func(state))
        except SecurityError as exc:
            raise TemplateProblem(f"refused by the sandbox: {exc}") from None
        except UndefinedError as exc:
            raise TemplateProblem(f"undefined: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure of the user's template is theirs to read
            raise TemplateProblem(f"{type(exc).__name__}: {exc}") from None
        if len(text) > MAX_RENDERED:
            raise TemplateProblem(f"renders {len(text):,} characters, at most {MAX_RENDERED:,}")
        return text.strip()

    def _join(self, context: dict[str, Any]) -> str | None:
        """The simple template's text, as Jinja renders it (a null as nothing, a value as str);
        None when a key is missing or not a mapping's: Jinja then renders it, and says why."""
        out = []
        for part in self.simple or ():
            if isinstance(part, str):
                out.append(part)
                continue
            value = context[part[0]]
            for key in part[1]:
                if not isinstance(value, Columns) or key not in value:
                    return None
                value = value[key]
            out.append("" if value is None else str(value))
        text = "".join(out)
        return text if len(text) <= MAX_RENDERED else None


class Compiler:
    """Compiles the catalog's templates in one environment, checking the variables they name."""

    def __init__(self) -> None:
        self.env = CatalogEnvironment()

    def context(self, variables: dict[str, Any]) -> dict[str, Any]:
        """The mapping templates are rendered with: the environment's globals (``range``,
        ``namespace``...) and the catalog's variables (which a template cannot rebind)."""
        return {**self.env.globals, **variables}

    def template(self, key: str, value: Any) -> Template:
        """A plain value stays one (no rendering per row); a string is a template."""
        if not isinstance(value, str):
            return Template(key, value, CATALOG)
        if "{" not in value:  # no {{ }}, {% %} or {# #}: constant text
            return Template(key, value.strip(), CATALOG)
        ast = self._parse(key, value)
        try:
            level = self._level(key, ast)
            compiled = self.env.from_string(ast)
        except TemplateSyntaxError as exc:  # an unknown filter or test is found when compiling
            left_out = " (left out: a catalog expands the same every time)" if "'random'" in str(exc) else ""
            raise TemplateProblem(f"template {key!r}: {exc.message}{left_out}") from None
        return Template(key, value, level, compiled, simple=_simple(ast))

    def expression(self, key: str, source: str) -> Template:
        ast = self._parse(key, "{{ (" + source + ") }}")
        try:
            level = self._level(key, ast)
            compiled = self.env.compile_expression(source, undefined_to_none=False)
        except TemplateSyntaxError as exc:
            raise TemplateProblem(f"template {key!r}: {exc.message}") from None
        return Template(key, source, level, compiled, expression=True)

    def _parse(self, key: str, source: str) -> nodes.Template:
        try:
            return self.env.parse(source)
        except TemplateSyntaxError as exc:
            raise TemplateProblem(f"template {key!r}: syntax error on line {exc.lineno}: {exc.message}") from None

    def _level(self, key: str, ast: nodes.Template) -> int:
        names = find_undeclared_variables(ast)
        unknown = sorted(n for n in names if n not in VARIABLES and n not in self.env.globals)
        if unknown:
            raise TemplateProblem(f"template {key!r} names unknown variable {unknown[0]!r} (the variables: "
                                  f"{', '.join(VARIABLES)})")
        return max((VARIABLES[n] for n in names if n in VARIABLES), default=CATALOG)


def _simple(ast: nodes.Template) -> tuple | None:
    """The parts of a template that is only text and ``{{ variable.key... }}`` outputs (no
    filter, test, call or statement), or None."""
    if len(ast.body) != 1 or not isinstance(ast.body[0], nodes.Output):
        return None
    parts: list = []
    for node in ast.body[0].nodes:
        if isinstance(node, nodes.TemplateData):
            parts.append(node.data)
            continue
        path = []
        while isinstance(node, (nodes.Getattr, nodes.Getitem)):
            if isinstance(node, nodes.Getattr):
                path.append(node.attr)
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                path.append(node.arg.value)
            else:
                return None
            node = node.node
        if not isinstance(node, nodes.Name) or node.name not in VARIABLES:
            return None
        parts.append((node.name, tuple(reversed(path))))
    return tuple(parts)


def attributes_read(template: Template, variable: str) -> set[str]:
    """The keys a template reads of ``variable`` by name (``product.sku``, ``product['sku']``),
    for checking them against the products table's columns before any row is read."""
    if template.compiled is None:
        return set()
    source = "{{ (" + template.source + ") }}" if template.expression else template.source
    ast = CatalogEnvironment().parse(source)
    # `product.x | default(...)` and `product.x is defined` expect x to be missing somewhere.
    guarded = {id(n.node) for n in ast.find_all(nodes.Filter) if n.name in ("default", "d")}
    guarded |= {id(n.node) for n in ast.find_all(nodes.Test) if n.name in ("defined", "undefined")}
    found = set()
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        target = getattr(node, "node", None)
        if id(node) in guarded or not (isinstance(target, nodes.Name) and target.name == variable):
            continue
        if isinstance(node, nodes.Getattr):
            found.add(node.attr)
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            found.add(node.arg.value)
    return {name for name in found if not name.startswith("_")}  # those are the sandbox's to refuse
