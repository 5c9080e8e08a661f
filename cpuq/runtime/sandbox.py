"""The jinja2 sandbox that chat templates run in (cpuq.runtime.template renders them): a
template is untrusted input, as much as the weights beside it, so it runs in an environment
that holds against a hostile file.

It is jinja2's ImmutableSandboxedEnvironment (no underscore attributes, no `mro`/function
internals, no list/dict mutation), with these changes:
* reaching for an unsafe attribute fails at once (jinja2 hands back an Undefined that
  prints as "", so `{{ ''.__class__ }}` would render silently);
* a budget per render: `RENDER_STEPS` steps (loop iterations, calls, operators, outputs),
  `RENDER_SECONDS` of wall time, and a size cap (set per render by the caller: budget_scope)
  on what the template writes (everywhere: top level, macros, `{% set %}` blocks) and on
  every string, list or number it builds. Operations whose result can outgrow their inputs
  many times over (`*`, `**`, `%`, str.format, center/ljust/rjust/zfill/expandtabs,
  replace, join, translate, to_bytes, and the filters center/indent/format/replace/join/
  wordwrap/batch/slice/tojson) are checked before they run; the rest after. The hooks are a
  rewrite of the parsed template (loops, outputs, literals and `~` pass through counting
  filters) plus the sandbox's own call/binop interception;
* `lipsum` and `urlize` are gone: no chat template uses them, and their output grows with
  their arguments in ways not worth bounding; `namespace` is a restricted one (no
  underscore-prefixed names, size-checked), and TemplateDict is a `dict` global that makes
  dicts and nothing else of the type.

Going over the budget raises LimitError (a jinja2 SecurityError); reaching outside the
sandbox raises SecurityError.

Imports jinja2 and the standard library; nothing from cpuq.
"""
from __future__ import annotations

import contextvars
import re
import string
import time
from collections.abc import Mapping
from contextlib import contextmanager
from functools import wraps
from itertools import islice
from typing import Any, Callable, Iterator

from jinja2 import nodes
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError
from jinja2.filters import make_attrgetter
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, pass_context
from jinja2.visitor import NodeTransformer

RENDER_STEPS = 2_000_000    # 0.3 s of empty loop iterations; rendering a chat of 1,000 turns takes ~50,000
RENDER_SECONDS = 10.0       # backstop for work between two steps (each step is bounded by the cap)
BASE_CAP = 1_000_000        # characters written / items in a value (chat templates add 4x their input's)
MAX_INT_BITS = 100_000      # str() of a larger int fails anyway (sys.get_int_max_str_digits)
MAX_JSON_INDENT = 64        # characters of tojson's indent and of each separator


class LimitError(SecurityError):
    """The render went over its budget."""


# the budget ----------------------------------------------------------------------------

class Budget:
    """Steps, time and size left to one render (or one compile)."""

    __slots__ = ("cap", "steps_left", "deadline", "written")

    def __init__(self, cap: int):
        self.cap = cap
        self.steps_left = RENDER_STEPS
        self.deadline = time.monotonic() + RENDER_SECONDS
        self.written = 0

    def step(self) -> None:
        self.steps_left -= 1
        if self.steps_left < 0:
            raise LimitError(f"more than {RENDER_STEPS} steps (loop iterations, calls, operators)")
        if time.monotonic() > self.deadline:
            raise LimitError(f"rendering took more than {RENDER_SECONDS:g} s")

    def need(self, size: int, what: str) -> None:
        if size > self.cap:
            raise LimitError(f"{what} would be {size} long, more than the limit of {self.cap}")


_BUDGET: contextvars.ContextVar[Budget] = contextvars.ContextVar("cpuq_chat_template_budget")


@contextmanager
def budget_scope(cap: int) -> Iterator[Budget]:
    """A fresh budget (steps, time, and `cap` characters / items) for the renders and
    compiles run inside the with block in this context."""
    budget = Budget(cap)
    token = _BUDGET.set(budget)
    try:
        yield budget
    finally:
        _BUDGET.reset(token)


def _budget() -> Budget:
    try:
        return _BUDGET.get()
    except LookupError:  # the environment used outside budget_scope: size checks still apply
        return Budget(BASE_CAP)


def _size(value: Any, cap: int) -> int:
    """How big `value` prints, roughly: characters of strings plus one per item, counted
    through every container (shared references counted each time, as str() and `+` copy
    them); stops early past `cap`."""
    total, stack = 0, [value]
    while stack:
        v = stack.pop()
        total += 1
        if isinstance(v, (str, bytes)):
            total += len(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            total += v.bit_length() // 3
        elif isinstance(v, Mapping):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        elif isinstance(v, Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
        if total > cap:
            break
    return total


def _check_value(value: Any, budget: Budget, what: str = "a value") -> Any:
    if isinstance(value, (str, bytes)):
        budget.need(len(value), what)
    elif isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > MAX_INT_BITS:
            raise LimitError(f"{what} is an integer of more than {MAX_INT_BITS} bits")
    elif isinstance(value, (list, tuple, Mapping, set, frozenset, Namespace)):
        budget.need(_size(value, budget.cap), what)
    return value


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _len(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes)) else len(str(value))


# checks before an operation, by what it is: each returns the (possibly materialized)
# arguments, or raises LimitError through budget.need.

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +\-]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[diouxXeEfFgGcrsa]")


def _check_widths(fmt: Any, args: Any, budget: Budget) -> None:
    """Field widths and precisions in a %-format or str.format string (literal, or taken
    from int arguments through `*` / nested fields) must stay under the cap."""
    if not isinstance(fmt, str):
        return
    values = args if isinstance(args, (tuple, list)) else (args,)
    if isinstance(args, Mapping):
        values = tuple(args.values())
    from_args = max((abs(v) for v in values if isinstance(v, int) and not isinstance(v, bool)), default=0)
    widths = []
    for m in _PERCENT_SPEC.finditer(fmt):
        for g in m.groups():
            widths.append(from_args if g == "*" else int(g) if g else 0)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        fields = []  # not a str.format string (the call itself will say if it is malformed)
    for _, _, spec, _ in fields:
        if spec:
            widths.extend(int(d) for d in re.findall(r"\d+", spec))
            if "{" in spec:
                widths.append(from_args)
    budget.need(max(widths, default=0), "a formatted field")


def _replace_size(s: Any, old: Any, new: Any, count: Any) -> int:
    if not isinstance(s, (str, bytes)):
        return 0
    old, new = (old, new) if isinstance(s, bytes) else (str(old), str(new))
    n = (len(s) + 1) if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _materialize(items: Any, budget: Budget) -> list:
    items = list(islice(items, budget.cap + 1)) if not isinstance(items, (list, tuple)) else items
    budget.need(len(items), "a joined sequence")
    return items


def _pre_join(budget, sep, args, kwargs):
    items = _materialize(args[0] if args else kwargs.get("iterable", ()), budget)
    budget.need(_size(items, budget.cap) + len(sep) * max(len(items) - 1, 0), "a joined string")
    return (items, *args[1:]), kwargs


def _pre_width(budget, s, args, kwargs):
    budget.need(max(len(s), _int(args[0]) if args else 0), "a padded string")
    return args, kwargs


def _pre_expandtabs(budget, s, args, kwargs):
    tabsize = args[0] if args else kwargs.get("tabsize", 8)
    budget.need(len(s) + s.count("\t" if isinstance(s, str) else b"\t") * _int(tabsize), "an expanded string")
    return args, kwargs


def _pre_replace(budget, s, args, kwargs):
    old, new = (list(args) + [None, None])[:2]
    count = args[2] if len(args) > 2 else kwargs.get("count", -1)
    if old is not None and new is not None and type(old) is type(new) is type(s):
        budget.need(_replace_size(s, old, new, count), "a replaced string")
    return args, kwargs


def _pre_translate(budget, s, args, kwargs):
    table = args[0] if args else None
    if isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, (str, bytes))), default=1)
        budget.need(len(s) * max(longest, 1), "a translated string")
    return args, kwargs


def _pre_format(budget, s, args, kwargs):
    _check_widths(s, tuple(args) + tuple(kwargs.values()), budget)
    return args, kwargs


def _pre_format_map(budget, s, args, kwargs):
    _check_widths(s, args[0] if args and isinstance(args[0], Mapping) else (), budget)
    return args, kwargs


# Methods of str/bytes whose result can be many times the size of their inputs.
_METHOD_CHECKS: dict[str, Callable] = {
    "center": _pre_width, "ljust": _pre_width, "rjust": _pre_width, "zfill": _pre_width,
    "expandtabs": _pre_expandtabs, "replace": _pre_replace, "join": _pre_join,
    "translate": _pre_translate, "format": _pre_format, "format_map": _pre_format_map,
}


def _check_call(obj: Any, args: tuple, kwargs: dict, budget: Budget) -> tuple[tuple, dict]:
    inner = getattr(obj, "__wrapped__", obj)  # jinja2 wraps str.format in its sandboxed formatter
    owner, name = getattr(inner, "__self__", None), getattr(inner, "__name__", None)
    if isinstance(owner, (str, bytes)) and name in _METHOD_CHECKS:
        return _METHOD_CHECKS[name](budget, owner, args, kwargs)
    if isinstance(owner, int) and name == "to_bytes":
        budget.need(_int(args[0] if args else kwargs.get("length", 1)), "int.to_bytes")
    return args, kwargs


# Filters whose result can be many times the size of their inputs; `args` start at the
# filtered value (after the context argument, for filters that take one).
def _filter_center(budget, args, kwargs):
    width = args[1] if len(args) > 1 else kwargs.get("width", 80)
    budget.need(max(_len(args[0]), _int(width)), "a centered string")
    return args, kwargs


def _filter_indent(budget, args, kwargs):
    s = str(args[0])
    width = args[1] if len(args) > 1 else kwargs.get("width", 4)
    per_line = width if isinstance(width, int) else len(str(width))
    budget.need(len(s) + (s.count("\n") + 1) * max(per_line, 0), "an indented string")
    return args, kwargs


def _filter_format(budget, args, kwargs):
    _check_widths(str(args[0]), tuple(args[1:]) + tuple(kwargs.values()), budget)
    return args, kwargs


def _filter_replace(budget, args, kwargs):
    s, old, new = (list(args) + [None, None, None])[:3]
    count = args[3] if len(args) > 3 else kwargs.get("count")
    if old is not None and new is not None:
        budget.need(_replace_size(str(s), old, new, -1 if count is None else count), "a replaced string")
    return args, kwargs


def _filter_join(budget, args, kwargs, eval_ctx=None):
    args = list(args)
    items = _materialize(args[0], budget)
    attribute = args[2] if len(args) > 2 else kwargs.pop("attribute", None)
    if attribute is not None:
        get = make_attrgetter(eval_ctx.environment, attribute)
        items = [get(x) for x in items]
        args = args[:2]
    sep = args[1] if len(args) > 1 else kwargs.get("d", "")
    budget.need(_size(items, budget.cap) + _len(sep) * max(len(items) - 1, 0), "a joined string")
    args[0] = items
    return tuple(args), kwargs


def _filter_wordwrap(budget, args, kwargs):
    s = str(args[0])
    width = args[1] if len(args) > 1 else kwargs.get("width", 79)
    wrap = args[3] if len(args) > 3 else kwargs.get("wrapstring")
    breaks = len(s) // max(_int(width), 1) + s.count("\n") + 1
    budget.need(len(s) + breaks * max(_len(wrap) if wrap is not None else 1, 1), "a wrapped string")
    return args, kwargs


def _filter_groups(budget, args, kwargs):
    n = args[1] if len(args) > 1 else kwargs.get("linecount", kwargs.get("slices", 1))
    budget.need(_int(n), "a batch or slice count")
    return args, kwargs


def _filter_tojson(budget, args, kwargs):
    names = ("ensure_ascii", "indent", "separators")
    options = dict(zip(names, args[1:]), **kwargs)
    indent, separators = options.get("indent"), options.get("separators")
    width = indent if isinstance(indent, int) else len(indent) if isinstance(indent, str) else 0
    if width > MAX_JSON_INDENT:
        raise LimitError(f"tojson indent longer than {MAX_JSON_INDENT}")
    if isinstance(separators, (list, tuple)) and any(_len(s) > MAX_JSON_INDENT for s in separators):
        raise LimitError(f"tojson separators longer than {MAX_JSON_INDENT}")
    return args, kwargs


_FILTER_CHECKS: dict[str, Callable] = {
    "center": _filter_center, "indent": _filter_indent, "format": _filter_format,
    "replace": _filter_replace, "join": _filter_join, "wordwrap": _filter_wordwrap,
    "batch": _filter_groups, "slice": _filter_groups, "tojson": _filter_tojson,
}


def _guard_filter(name: str, f: Callable) -> Callable:
    """`f` with the budget applied: a step, the check before (if it has one), the size after."""
    check = _FILTER_CHECKS.get(name)
    n_ctx = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

    @wraps(f)  # keeps jinja_pass_arg, so jinja still passes the context/environment
    def guarded(*args, **kwargs):
        budget = _budget()
        budget.step()
        if check is not None:
            head, rest = args[:n_ctx], args[n_ctx:]
            if check is _filter_join:
                rest, kwargs = _filter_join(budget, rest, kwargs, eval_ctx=head[0] if head else None)
            else:
                rest, kwargs = check(budget, rest, kwargs)
            args = (*head, *rest)
        return _check_value(f(*args, **kwargs), budget, f"the result of |{name}")

    return guarded


# safe containers -------------------------------------------------------------------------

class TemplateDict:
    """transformers' `dict` global: dict(...) and dict.fromkeys(...) and nothing else of the type."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class TemplateNamespace(Namespace):
    """transformers' `namespace`: no underscore-prefixed names; here also size-checked."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja2's signature trick: namespace(self=...) works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)
        _check_value(self, _budget(), "a namespace")

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r}: names starting with '_' are not allowed")


# the environment -------------------------------------------------------------------------

class _Instrument(NodeTransformer):
    """Routes the parsed template's loops, outputs, literals and `~` through the counting
    filters, so the budget sees every iteration and every character written."""

    @staticmethod
    def _wrap(node: nodes.Expr, name: str) -> nodes.Filter:
        return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = self._wrap(node.iter, "_cpuq_loop")
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [self._wrap(nodes.Const(c.data, lineno=c.lineno) if isinstance(c, nodes.TemplateData) else c,
                                 "_cpuq_emit") for c in node.nodes]
        return node

    def _value(self, node: nodes.Expr) -> nodes.Expr:
        self.generic_visit(node)
        return self._wrap(node, "_cpuq_value") if getattr(node, "ctx", "load") == "load" else node

    visit_Concat = visit_List = visit_Tuple = visit_Dict = _value


class _InstrumentingCodeGenerator(CodeGenerator):
    def visit_Template(self, node: nodes.Template, frame: Any = None) -> None:
        _Instrument().visit(node)
        node.set_environment(self.environment)  # the new nodes need it for constant folding
        super().visit_Template(node, frame)


@pass_context
def _loop_filter(context: Any, iterable: Any):
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


@pass_context
def _emit_filter(context: Any, value: Any) -> str:
    budget = _budget()
    budget.step()
    text = str(value)
    budget.written += len(text)
    if budget.written > budget.cap:
        raise LimitError(f"output longer than {budget.cap} characters")
    return text


@pass_context
def _value_filter(context: Any, value: Any) -> Any:
    budget = _budget()
    budget.step()
    return _check_value(value, budget)


class ChatSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox, instrumented for the budget; build it with sandboxed_environment."""

    code_generator_class = _InstrumentingCodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is not allowed")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's signature)
        budget = _budget()
        budget.step()
        args, kwargs = _check_call(__obj, args, kwargs, budget)
        return _check_value(super().call(__context, __obj, *args, **kwargs), budget, "the result of a call")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                    budget.need(_size(seq, budget.cap) * max(n, 0), "a repeated sequence")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
                if right * abs(left).bit_length() > MAX_INT_BITS:
                    raise LimitError(f"an integer power of more than {MAX_INT_BITS} bits")
        elif operator == "%":
            _check_widths(left, right, budget)
        return _check_value(self.binop_table[operator](left, right), budget, f"the result of {operator!r}")


def sandboxed_environment(extra_filters: Mapping[str, Callable] | None = None,
                          extra_globals: Mapping[str, Any] | None = None, **options: Any) -> ChatSandbox:
    """The hardened environment, with `extra_filters` and `extra_globals` added (the filters under the
    budget as jinja2's own are) and jinja2 Environment `options` (extensions, trim_blocks, ...)."""
    env = ChatSandbox(**options)
    env.filters.update(extra_filters or {})
    env.filters.pop("urlize", None)
    env.globals.pop("lipsum", None)
    env.globals["namespace"] = TemplateNamespace
    env.globals.update(extra_globals or {})
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters.update(_cpuq_loop=_loop_filter, _cpuq_emit=_emit_filter, _cpuq_value=_value_filter)
    return env
