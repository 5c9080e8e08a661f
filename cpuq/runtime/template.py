"""Chat templates: the Jinja program in a GGUF's `tokenizer.chat_template` that turns a
conversation into prompt text, rendered as HF transformers renders it
(transformers/utils/chat_template_utils.py, transformers 5.23), in the sandbox of
cpuq.runtime.sandbox (a template is untrusted input: no escapes, a budget of steps, time and
size per render, the size cap 1M + 4x the input's characters).

What a template sees, as in transformers' apply_chat_template: `messages`, `tools` (None or a
list of JSON-schema dicts), `documents` (None unless given), `add_generation_prompt`,
`bos_token`, `eos_token`, any extra keyword arguments (e.g. Qwen3's `enable_thinking`),
the functions `raise_exception(msg)` and `strftime_now(fmt)`, `dict` and `namespace` in
transformers' restricted forms, the `tojson` filter with json.dumps semantics
(ensure_ascii=False, indent/separators/sort_keys options, no HTML escaping), the
`{% generation %}` tag (rendered as its body), `{% break %}`/`{% continue %}`, and
trim_blocks/lstrip_blocks. Messages are copied as plain JSON data with None-valued keys
dropped, as transformers does (an assistant turn with tool_calls and content=None reaches the
template without `content`).

Errors: a template that does not compile, reaches outside the sandbox, exceeds the budget or
fails while rendering raises FormatError ("chat template: line N: ..."); `raise_exception`
raises InputError with the template's message (the template rejecting the conversation);
messages that are not a non-empty list of {"role": str, "content": str} dicts (content may be
absent when the message has tool_calls), or values that are not JSON data, raise InputError.
Deliberately unlike transformers: tools must be JSON-schema dicts (no Python functions), and
non-JSON values are an error rather than a "<type>" placeholder.

Imports from cpuq: errors and runtime.sandbox.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any, Sequence

import jinja2.ext
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

from ..errors import FormatError, InputError
from .sandbox import BASE_CAP, ChatSandbox, LimitError, TemplateDict, budget_scope, sandboxed_environment

# The template used when the file has none: ChatML, as llama.cpp's fallback (and Qwen's and
# SmolLM2's templates without their default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] if message['content'] is string else '')"
    " + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_MESSAGE_CHARS = 300        # of an error message quoted from the template


class ChatTemplate:
    """A compiled chat template: `ChatTemplate(source, bos_token, eos_token).render(messages)`.

    `source` is the Jinja text (a GGUF's tokenizer.chat_template), or None for ChatML
    (CHATML_TEMPLATE: `<|im_start|>{role}\\n{content}<|im_end|>\\n` per message, then
    `<|im_start|>assistant\\n` when add_generation_prompt). `bos_token`/`eos_token` are the
    texts of those tokens; None leaves the name undefined in the template, as transformers
    does for a tokenizer without one. A template that does not compile is a FormatError
    naming the line.
    """

    def __init__(self, source: str | None, bos_token: str | None, eos_token: str | None):
        if source is not None and not isinstance(source, str):
            raise FormatError(f"chat template: expected a string, got {type(source).__name__}")
        for name, token in (("bos_token", bos_token), ("eos_token", eos_token)):
            if token is not None and not isinstance(token, str):
                raise InputError(f"{name}: expected a string or None, got {type(token).__name__}")
        self.source = CHATML_TEMPLATE if source is None else source
        self.is_fallback = source is None
        self._special = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
        try:
            with budget_scope(BASE_CAP):  # compile-time constant folding runs filters too
                self._template = _environment().from_string(self.source)
        except TemplateSyntaxError as e:
            raise FormatError(f"chat template: line {e.lineno}: {_one_line(e.message)}") from None
        except (TemplateError, LimitError, RecursionError, MemoryError) as e:
            raise FormatError(f"chat template: {_one_line(str(e) or type(e).__name__)}") from None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               tools: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """The prompt text for `messages`, ending with the assistant header when
        `add_generation_prompt`. `tools` are JSON-schema dicts; `extra` become template
        variables (they override bos_token/eos_token, as in transformers; `documents` too)."""
        counter = [0]  # characters of input, which scale the size cap
        chat = _plain_messages(messages, counter)
        if tools is not None:
            if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
                raise InputError(f"tools: expected a list of JSON-schema dicts, got {type(tools).__name__}")
            for i, t in enumerate(tools):
                if not isinstance(t, Mapping):  # transformers also takes Python functions; cpuq does not
                    raise InputError(f"tools[{i}]: expected a JSON-schema dict, got {type(t).__name__}")
            tools = [_plain(t, f"tools[{i}]", counter) for i, t in enumerate(tools)]
        variables = {**self._special, "documents": None,
                     **{k: _plain(v, k, counter) for k, v in extra.items()},
                     "messages": chat, "tools": tools, "add_generation_prompt": bool(add_generation_prompt)}
        pieces, written = [], 0
        try:
            with budget_scope(BASE_CAP + 4 * counter[0]) as budget:
                for piece in self._template.generate(**variables):
                    written += len(piece)
                    if written > budget.cap:
                        raise LimitError(f"output longer than {budget.cap} characters")
                    pieces.append(piece)
        except _Rejected as e:
            raise InputError(f"chat template: {_one_line(str(e))}") from None
        except TemplateSyntaxError as e:  # from a nested compile (e.g. an include); same as at construction
            raise FormatError(f"chat template: line {e.lineno}: {_one_line(e.message)}") from None
        except SecurityError as e:  # LimitError included
            raise FormatError(f"chat template:{_line(e)} {_one_line(str(e))}") from None
        except RecursionError as e:
            raise FormatError(f"chat template:{_line(e)} recursion too deep") from None
        except MemoryError as e:
            raise FormatError(f"chat template:{_line(e)} out of memory") from None
        except TemplateError as e:
            raise FormatError(f"chat template:{_line(e)} {_one_line(e.message or type(e).__name__)}") from None
        except Exception as e:  # a TypeError, ZeroDivisionError, ... inside the template
            raise FormatError(f"chat template:{_line(e)} {type(e).__name__}: {_one_line(str(e))}") from None
        return "".join(pieces)


# input: messages and variables as plain JSON data -----------------------------------------

def _plain_messages(messages: Any, counter: list[int]) -> list[dict]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence) or not messages:
        raise InputError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
    chat = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise InputError(f"{where}: expected a dict with 'role' and 'content', got {type(message).__name__}")
        # Dropped, as transformers' apply_chat_template drops them: APIs send content=None or
        # tool_calls=None, and templates handle a missing key better than a None.
        message = _plain({k: v for k, v in message.items() if v is not None}, where, counter)
        if not isinstance(message.get("role"), str):
            raise InputError(f"{where}: 'role' must be a string, got {_type_name(message.get('role'))}")
        content = message.get("content")
        if not isinstance(content, str) and not ("content" not in message and "tool_calls" in message):
            raise InputError(f"{where}: 'content' must be a string (or absent when the message has tool_calls), "
                             f"got {_type_name(content)}")
        # transformers fills the standard reasoning field from its older names (and `thinking`
        # for gpt-oss templates); chat_template_utils._alias_reasoning_fields.
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


def _plain(value: Any, where: str, counter: list[int], depth: int = 0) -> Any:
    """A copy of `value` made of dict/list/tuple/str/int/float/bool/None only (subclasses
    reduced to their base type), counting characters into counter[0]; InputError otherwise."""
    if depth > 100:
        raise InputError(f"{where}: nested more than 100 levels deep")
    kind = type(value)
    if value is None or kind in (bool, int, float):
        return value
    if kind is str:
        counter[0] += len(value)
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):  # an enum or other subclass: its methods stay outside
        counter[0] += len(value)
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            key = _plain(k, where, counter, depth + 1)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise InputError(f"{where}: dict key of type {type(k).__name__} is not JSON data")
            out[key] = _plain(v, f"{where}[{k!r}]", counter, depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        items = [_plain(v, f"{where}[{i}]", counter, depth + 1) for i, v in enumerate(value)]
        return items if isinstance(value, list) else tuple(items)
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy" and getattr(value, "shape", None) == ():
        return _plain(item(), where, counter, depth)
    raise InputError(f"{where}: a {type(value).__name__} is not JSON data (dict, list, str, number, bool, None)")


def _type_name(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


# errors ------------------------------------------------------------------------------

class _Rejected(Exception):
    """raise_exception() in a template: the conversation is not one it accepts."""


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


def _line(exc: BaseException) -> str:
    """' line N:' of the innermost template frame in the traceback (jinja2 rewrites
    tracebacks to point into the template source), or ''."""
    lineno, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            lineno = tb.tb_lineno
        tb = tb.tb_next
    return f" line {lineno}:" if lineno is not None else ""


# the environment -------------------------------------------------------------------------

def _raise_exception(message: Any) -> None:
    raise _Rejected(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # transformers' filter: json.dumps as is, where jinja2's own escapes HTML characters
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationTag(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (it marks assistant text for
    training masks); rendering it is rendering its body."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@lru_cache(maxsize=1)
def _environment() -> ChatSandbox:
    return sandboxed_environment(trim_blocks=True, lstrip_blocks=True,
                                 extensions=[_GenerationTag, jinja2.ext.loopcontrols],
                                 extra_filters={"tojson": _tojson},
                                 extra_globals={"raise_exception": _raise_exception, "strftime_now": _strftime_now,
                                                "dict": TemplateDict()})
