"""cpuq.runtime.template: chat templates rendered as HF transformers renders them, in a
sandbox (cpuq.runtime.sandbox) that a hostile GGUF cannot leave, hang or blow up.

References: the expected strings below are what transformers 5.23's apply_chat_template
renders for the same template and conversation (the `peer` test at the end checks this
file's templates and every template in llama.cpp's models/templates/ against transformers
itself, run in the torch venv as a subprocess). data/qwen2.5-instruct.jinja is Qwen2.5's
template verbatim, as llama.cpp keeps it (models/templates/Qwen-Qwen2.5-7B-Instruct.jinja,
from Qwen/Qwen2.5-7B-Instruct's tokenizer_config.json).
"""
from __future__ import annotations

import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cpuq
from cpuq.errors import FormatError, InputError
from cpuq.runtime.template import CHATML_TEMPLATE, ChatTemplate
from tests.convert.test_convert_peer import HF_PYTHON, LLAMA_CPP

QWEN25 = (Path(__file__).parent / "data" / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
QWEN_SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
USER = [{"role": "user", "content": "Hi"}]

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city (°C)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}},
                   "required": ["city"]}}}]
TOOL_CALL = {"type": "function", "id": "call0", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
# name -> (messages, keyword arguments of render); the peer test renders each with
# add_generation_prompt True and False.
CONVERSATIONS = {
    "user": ([{"role": "user", "content": "Hello!"}], {}),
    "system_user": ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}], {}),
    "multi_turn": ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                    {"role": "assistant", "content": "4"},
                    {"role": "user", "content": "And 3+3? \"quoted\" <b>é</b> {{ not jinja }} 😀\n\nnew paragraph"}],
                   {}),
    "ends_with_assistant": ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], {}),
    "tools": ([{"role": "user", "content": "Weather in Paris?"}], {"tools": TOOLS}),
    "tool_call": ([{"role": "user", "content": "Weather in Paris?"},
                   {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                   {"role": "tool", "content": "{\"temp\": 21}", "tool_call_id": "call0", "name": "get_weather"}],
                  {"tools": TOOLS}),
    "tool_call_empty_content": ([{"role": "user", "content": "Weather in Paris?"},
                                 {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                                 {"role": "tool", "content": "21 C", "tool_call_id": "call0"},
                                 {"role": "assistant", "content": "It is 21 C."}], {"tools": TOOLS}),
    "reasoning": ([{"role": "user", "content": "Think."},
                   {"role": "assistant", "content": "Done.", "reasoning_content": "hmm"},
                   {"role": "user", "content": "Again"}], {"enable_thinking": False}),
}


def render(source, messages=USER, bos_token="<s>", eos_token="</s>", **kwargs) -> str:
    return ChatTemplate(source, bos_token, eos_token).render(messages, **kwargs)


# what templates render ------------------------------------------------------------------

def test_chatml_fallback():
    t = ChatTemplate(None, "<s>", "</s>")
    assert t.is_fallback and t.source == CHATML_TEMPLATE
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                {"role": "assistant", "content": "A"}]
    assert t.render(messages) == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
                                  "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>assistant\n")
    assert t.render(USER, add_generation_prompt=False) == "<|im_start|>user\nHi<|im_end|>\n"
    # a tool call without content renders as an empty turn, not an error
    call = [{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]}]
    assert t.render(call, add_generation_prompt=False) == "<|im_start|>assistant\n<|im_end|>\n"


def test_smollm2_demo_template():
    from cpuq.demo import demo_model_path
    try:
        path = demo_model_path()
    except InputError:
        pytest.skip("demo model not installed")
    source = cpuq.open_gguf(path).get("tokenizer.chat_template")
    t = ChatTemplate(source, "<|im_start|>", "<|im_end|>")
    assert not t.is_fallback
    assert t.render(USER) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                              "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    system = [{"role": "system", "content": "Be brief."}, *USER]
    assert t.render(system, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n")


def test_qwen25_template():
    t = ChatTemplate(QWEN25, None, "<|im_end|>")
    assert t.render([{"role": "system", "content": "You are terse."}, *USER]) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert t.render([*USER, {"role": "assistant", "content": "Hello!"}], add_generation_prompt=False) == (
        QWEN_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n")
    messages, kwargs = CONVERSATIONS["tool_call"]
    assert t.render(messages, **kwargs) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\nYou are provided with function "
        "signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city (°C)", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City name"}}, '
        '"required": ["city"]}}}\n</tools>\n\nFor each function call, return a json object with function name and '
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")


def test_variables_and_helpers():
    src = "{{ bos_token }}|{{ eos_token }}|{{ tools }}|{{ documents }}|{{ add_generation_prompt }}|{{ lang }}"
    assert render(src, lang="fr") == "<s>|</s>|None|None|True|fr"
    # as in transformers, keyword arguments override the special tokens; a None token is undefined
    assert render(src, bos_token=None, add_generation_prompt=False, eos_token="E", lang=1,
                  documents=[{"title": "t", "text": "x"}]) == "|E|None|[{'title': 't', 'text': 'x'}]|False|1"
    assert render("{{ bos_token is defined }}", bos_token=None) == "False"
    assert render("{{ strftime_now('%Y') }}") == str(datetime.datetime.now().year)
    # tojson as transformers: no ASCII or HTML escaping, json.dumps options
    assert render("{{ messages[0]|tojson }}", [{"role": "user", "content": "é <b> & '"}]) == (
        '{"role": "user", "content": "é <b> & \'"}')
    assert render("{{ {'b': 1, 'a': [1]}|tojson(indent=2, sort_keys=True) }}") == (
        '{\n  "a": [\n    1\n  ],\n  "b": 1\n}')
    # dict and namespace in transformers' forms; loop controls; the {% generation %} tag
    assert render("{{ dict(a=1) }}{{ dict.fromkeys(['x'], 0) }}") == "{'a': 1}{'x': 0}"
    assert render("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}"
                  "{{ ns.n }}", USER * 3) == "3"
    assert render("{% for i in range(9) %}{% if i == 1 %}{% continue %}{% endif %}{% if i > 3 %}{% break %}"
                  "{% endif %}{{ i }}{% endfor %}") == "023"
    assert render("{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}") == "Hi"


def test_whitespace_control():
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it
    assert render("{% if true %}\n    x\n    {% endif %}\ny") == "    x\ny"


def test_messages_are_plain_copies():
    messages = [{"role": "user", "content": "Hi", "tool_calls": None, "meta": {"n": (1, 2.5, True)}}]
    before = json.dumps(messages)
    # None-valued keys are dropped (transformers does it); tuples stay tuples; the caller's list is untouched
    assert render("{{ messages[0] }}", messages) == "{'role': 'user', 'content': 'Hi', 'meta': {'n': (1, 2.5, True)}}"
    assert json.dumps(messages) == before
    # transformers' aliases of the reasoning field
    msgs = [{"role": "assistant", "content": "x", "reasoning": "r"}]
    assert render("{{ messages[0].reasoning_content }}{{ messages[0].thinking }}", msgs) == "rr"



def test_the_sandbox_knows_nothing_of_chat_templates():
    # template.py imports sandbox.py, never the reverse: the sandbox holds the hardened
    # environment and its budget, the template what transformers' chat templates expect
    code = "import sys, cpuq.runtime.sandbox; print('cpuq.runtime.template' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip() == "False"

# bad conversations: InputError ------------------------------------------------------------

@pytest.mark.parametrize("messages, fragment", [
    ("hi", "messages: expected a non-empty list"),
    ([], "messages: expected a non-empty list"),
    ({"role": "user"}, "messages: expected a non-empty list"),
    (["hi"], "messages[0]: expected a dict"),
    ([{"content": "x"}], "messages[0]: 'role' must be a string"),
    ([{"role": "user", "content": 3}], "messages[0]: 'content' must be a string"),
    ([{"role": "user"}], "messages[0]: 'content' must be a string"),
    ([{"role": "user", "content": None}], "messages[0]: 'content' must be a string"),
    ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], "messages[0]: 'content' must be a string"),
    ([USER[0], {"role": "user", "content": "x", "extra": object()}], "messages[1]['extra']: a object is not JSON"),
])
def test_bad_messages(messages, fragment):
    with pytest.raises(InputError, match=None) as e:
        render(None, messages)
    assert fragment in str(e.value)


def test_bad_tools_and_variables():
    with pytest.raises(InputError, match=r"^tools: expected a list"):
        render(None, tools={"type": "function"})
    with pytest.raises(InputError, match=r"^tools\[0\]: expected a JSON-schema dict"):
        render(None, tools=[print])
    with pytest.raises(InputError, match=r"^hook: a function is not JSON data"):
        render(None, hook=lambda: 1)


def test_raise_exception_is_input_error():
    src = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must alternate\n"
           "user/assistant/user/assistant/...') }}{% endif %}ok")
    assert render(src) == "ok"
    with pytest.raises(InputError) as e:
        render(src, [{"role": "assistant", "content": "x"}])
    assert str(e.value) == "chat template: Conversation roles must alternate user/assistant/user/assistant/..."


# bad templates: FormatError ---------------------------------------------------------------

@pytest.mark.parametrize("source, line", [
    ("{% for m in messages %}{{ m.content }}", 1),
    ("ok\n\n{{ messages[0] + }}", 3),
    ("{% if x %}\n{% endfor %}", 2),
    ("{{ x | no_such_filter }}", 1),
])
def test_syntax_error_at_construction(source, line):
    with pytest.raises(FormatError) as e:
        ChatTemplate(source, "", "")
    assert str(e.value).startswith(f"chat template: line {line}: ")
    assert "\n" not in str(e.value)


def test_not_a_string():
    with pytest.raises(FormatError, match=r"^chat template: expected a string, got int"):
        ChatTemplate(3, "", "")


@pytest.mark.parametrize("source, message", [
    ("{{ foo.bar }}", "chat template: line 1: 'foo' is undefined"),
    ("x\n{{ 1 / 0 }}", "chat template: line 2: ZeroDivisionError: division by zero"),
    ("{% include 'other.jinja' %}", "chat template: line 1: TypeError: no loader for this environment specified"),
    ("{{ lipsum(2) }}", "chat template: line 1: 'lipsum' is undefined"),
])
def test_runtime_error(source, message):
    with pytest.raises(FormatError) as e:
        render(source)
    assert str(e.value) == message


# Attempts to leave the sandbox. Each must fail with FormatError before anything runs;
# the first few would run a shell command outside a sandbox.
ESCAPES = [
    # CVE-2024-34359 (llama-cpp-python <= 0.2.71, GHSA-56xg-wfcc-g829): the published proof of
    # concept, a tokenizer.chat_template that reaches os.popen through warnings.catch_warnings
    "{% for x in ().__class__.__base__.__subclasses__() %}{% if \"warning\" in x.__name__ %}"
    "{{x()._module.__builtins__['__import__']('os').popen(\"touch {canary}\")}}{%endif%}{% endfor %}",
    # CVE-2024-56326 (jinja2 < 3.1.5): a stored reference to str.format, called later, reads
    # attributes the sandbox forbids (a module's globals: a leak, the step before an escape)
    "{% set f = '{0.__init__.__globals__}'.format %}{{ f(cycler) }}",
    # CVE-2025-27516 (jinja2 < 3.1.6): the same through the attr filter
    "{{ ('{0.__init__.__globals__}'|attr('format'))(cycler) }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {canary}').read() }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c('touch {canary}', shell=True) }}{% endif %}{% endfor %}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch {canary}') }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ strftime_now.__globals__ }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ messages.__class__ }}",
    "{{ messages[0]['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{{ messages|map(attribute='__class__')|list }}",
    "{{ '{0.__class__}'.format(1) }}",
    "{{ (messages|map('upper')).gi_frame }}",
    "{{ range.__globals__ }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ ''.__class__ }}",  # jinja2 alone renders this as "": here it is an error too
    "{% set x = messages.append(1) %}",
    "{{ messages.pop() }}",
    "{% set x = messages[0].update({'role': 'system'}) %}",
    "{% set x = tools.clear() %}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{% set ns = namespace(__init__=1) %}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_sandbox_escapes_fail(source, tmp_path):
    canary = tmp_path / "canary"
    with pytest.raises(FormatError) as e:
        render(source.replace("{canary}", str(canary)), tools=TOOLS)
    assert str(e.value).startswith("chat template:") and "\n" not in str(e.value)
    assert not canary.exists()



# Every list and dict method that mutates, on each kind of data a template receives. jinja2
# 3.1.4's sandbox let list.pop() and list.clear() through (fixed in 3.1.5; pyproject asks for
# >= 3.1.6, which also closes CVE-2025-27516 above).
MUTATIONS = ([f"messages.{call}" for call in ("pop()", "pop(0)", "clear()", "append(1)", "extend([1])",
                                              "insert(0, 1)", "remove(messages[0])", "reverse()", "sort()")]
             + [f"messages[0].{call}" for call in ("pop('role')", "popitem()", "clear()", "update(role='system')",
                                                   "setdefault('x', 1)", "__setitem__('role', 'system')")]
             + ["tools.pop()", "tools[0].clear()", "tools[0]['function'].update(name='x')", "meta.pop('k')",
                "meta['items'].pop()", "(messages|list).pop()", "messages[0].items()|list|attr('pop')"])


@pytest.mark.parametrize("call", MUTATIONS)
def test_templates_cannot_mutate_their_data(call):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    tools = json.loads(json.dumps(TOOLS))
    meta = {"k": "v", "items": [1, 2, 3]}
    before = json.dumps([messages, tools, meta])
    with pytest.raises(FormatError) as e:
        render("{% set x = " + call + " %}{{ messages|length }}{{ x }}", messages, tools=tools, meta=meta)
    assert str(e.value).startswith("chat template: line 1:") and ("unsafe" in str(e.value)
                                                                  or "not allowed" in str(e.value)), str(e.value)
    assert json.dumps([messages, tools, meta]) == before  # the caller's data, whatever the template does

# Templates that would hang or exhaust memory. Each must fail within a couple of seconds.
BOMBS = [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "steps"),
    ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output longer than"),
    ("{% set x %}{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}{% endset %}", "output longer than"),
    ("{% macro m() %}{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}{% endmacro %}{% set x = m() %}",
     "output longer than"),
    ("{{ 'a' * 10000000000 }}", "repeated sequence"),
    ("{{ ['a'] * 10000000000 }}", "repeated sequence"),
    ("{{ 2 ** 1000000000 }}", "integer power"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "limit"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "limit"),
    ("{% set ns = namespace(n=3) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}", "bits"),
    ("{% set a = ['x' * 1000] %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
     "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}{% set e = [d, d, d, d, d, d, d, d, d, d] %}{{ e }}", "limit"),
    ("{{ dict.fromkeys(range(100000), 'x' * 100000) }}", "limit"),
    ("{{ 'a'|center(10000000000) }}", "centered"),
    ("{{ 'a'.ljust(10000000000) }}", "padded"),
    ("{{ ('x' * 1000)|indent(10000000) }}", "indented"),
    ("{{ '%10000000000d' % 1 }}", "formatted field"),
    ("{{ '%*d' % (10000000000, 1) }}", "formatted field"),
    ("{{ '{:>10000000000}'.format(1) }}", "formatted field"),
    ("{{ '{:>{w}}'.format(1, w=10000000000) }}", "formatted field"),
    ("{{ '%10000000000d'|format(1) }}", "formatted field"),
    ("{{ ('y' * 100000).replace('', 'y' * 100000) }}", "replaced"),
    ("{{ ('y' * 100000)|replace('y', 'y' * 100000) }}", "replaced"),
    ("{{ ('x' * 100000).join(['y' * 1000] * 100) }}", "joined"),
    ("{{ (['y' * 1000] * 100)|join('x' * 100000) }}", "joined"),
    ("{{ ('\t' * 100000).expandtabs(100000) }}", "expanded"),
    ("{{ ('a' * 100000).translate({97: 'b' * 100000}) }}", "translated"),
    ("{{ (1).to_bytes(10000000000, 'big') }}", "to_bytes"),
    ("{{ range(10)|batch(10000000000, 'x')|list }}", "batch or slice"),
    ("{{ ('a b ' * 100000)|wordwrap(1, wrapstring='x' * 100000) }}", "wrapped"),
    ("{{ messages|tojson(indent=100000) }}", "indent"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion too deep"),
    ("{% for m in [[1]] recursive %}{{ loop(m * 2) }}{% endfor %}", "chat template: line 1:"),
]


@pytest.mark.parametrize("source, fragment", BOMBS)
def test_resource_bombs_fail_fast(source, fragment):
    start = time.perf_counter()
    with pytest.raises(FormatError) as e:
        render(source)
    # 2 s: the step budget (2M steps) takes ~0.3 s on a 2-core CI runner
    assert time.perf_counter() - start < 2.0
    assert str(e.value).startswith("chat template:") and fragment in str(e.value)


def test_budget_scales_with_input():
    # a 3M-character message is over the fixed 1M cap but renders: the cap grows with the input
    big = "word " * 600_000
    out = ChatTemplate(QWEN25, None, "<|im_end|>").render([{"role": "user", "content": big}])
    assert big in out


def test_rendering_is_cheap():
    # budget bookkeeping costs about 30% over plain jinja2 (1.3 vs 1.0 ms for the Qwen3
    # template over 51 messages); here: 100 messages in well under the 0.1 s bound
    t = ChatTemplate(QWEN25, None, "<|im_end|>")
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 20} for i in range(100)]
    t.render(messages)
    start = time.perf_counter()
    t.render(messages)
    assert time.perf_counter() - start < 0.1


# against transformers -------------------------------------------------------------------------

# Runs in the torch venv: argv[1] = cases.json; prints one {"text"} or {"error", "message"} per case.
_HF_RENDER = """
import json, sys
import jinja2
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast
out = []
for c in json.load(open(sys.argv[1], encoding="utf-8")):
    special = {k: c[k] for k in ("bos_token", "eos_token") if c[k] is not None}
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **special)
    try:
        out.append({"text": tok.apply_chat_template(c["messages"], chat_template=c["template"], tools=c["tools"],
                                                    add_generation_prompt=c["add_generation_prompt"],
                                                    tokenize=False, **c["extra"])})
    except jinja2.exceptions.TemplateError as e:
        # raise_exception raises TemplateError itself; jinja2's own failures raise subclasses
        kind = "raise_exception" if type(e) is jinja2.exceptions.TemplateError else type(e).__name__
        out.append({"error": kind, "message": str(e)})
    except Exception as e:
        out.append({"error": type(e).__name__, "message": str(e)})
json.dump(out, sys.stdout)
"""


def _peer_templates() -> dict[str, str]:
    templates = {"qwen2.5-instruct (tests/runtime/data)": QWEN25, "chatml fallback": CHATML_TEMPLATE}
    try:
        from cpuq.demo import demo_model_path
        templates["smollm2 (demo GGUF)"] = cpuq.open_gguf(demo_model_path()).get("tokenizer.chat_template")
    except InputError:
        pass
    for path in sorted((LLAMA_CPP / "models" / "templates").glob("*.jinja")):
        templates[path.name] = path.read_text(encoding="utf-8")
    return templates


@pytest.mark.peer
def test_matches_transformers(tmp_path):
    """Every template x conversation x add_generation_prompt: the same text as transformers,
    or, where transformers fails, a failure here too (InputError exactly where the template
    called raise_exception, with its message)."""
    if not HF_PYTHON.exists():
        pytest.skip(f"{HF_PYTHON} missing (torch+transformers venv)")
    templates = _peer_templates()
    cases = [{"name": f"{tname} / {cname} / add_generation_prompt={agp}", "template": source,
              "bos_token": "<s>", "eos_token": "</s>", "messages": messages, "tools": kwargs.get("tools"),
              "extra": {k: v for k, v in kwargs.items() if k != "tools"}, "add_generation_prompt": agp}
             for tname, source in templates.items()
             for cname, (messages, kwargs) in CONVERSATIONS.items() for agp in (True, False)]
    (tmp_path / "cases.json").write_text(json.dumps(cases), encoding="utf-8")
    r = subprocess.run([str(HF_PYTHON), "-c", _HF_RENDER, str(tmp_path / "cases.json")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    expected = json.loads(r.stdout)
    compiled, failures, texts = {}, [], 0
    for case, want in zip(cases, expected):
        try:
            if case["template"] not in compiled:
                compiled[case["template"]] = ChatTemplate(case["template"], case["bos_token"], case["eos_token"])
            got = {"text": compiled[case["template"]].render(case["messages"], case["add_generation_prompt"],
                                                              case["tools"], **case["extra"])}
        except (InputError, FormatError) as e:
            got = {"error": type(e).__name__, "message": str(e)}
        if "text" in want:
            ok = got.get("text") == want["text"]
            texts += ok
        elif want["error"] == "raise_exception":
            ok = got == {"error": "InputError", "message": "chat template: " + " ".join(want["message"].split())}
        else:
            ok = "error" in got
        if not ok:
            failures.append(f"{case['name']}:\n  transformers: {json.dumps(want)[:400]}\n"
                            f"  cpuq: {json.dumps(got)[:400]}")
    assert not failures, f"{len(failures)} of {len(cases)} differ:\n" + "\n".join(failures[:10])
    # most cases render (the rest: templates that reject a conversation, e.g. tool calls without content)
    assert texts > 0.8 * len(cases)


def test_cve_2024_34359_payload_is_live_without_the_sandbox(tmp_path):
    """The payload above is the real thing: plain (unsandboxed) jinja2, as llama-cpp-python
    0.2.71 used it, runs its command. In a fresh interpreter, as in a program that renders
    a template: the payload picks the first class whose name holds "warning", which is
    warnings.catch_warnings there (in this test process numpy.testing's comes first)."""
    import subprocess
    import sys
    canary = tmp_path / "canary"
    code = ("import sys, jinja2; jinja2.Environment().from_string(sys.argv[1]).render()")
    subprocess.run([sys.executable, "-c", code, ESCAPES[0].replace("{canary}", str(canary))], check=True, timeout=60)
    deadline = time.monotonic() + 5  # popen returns before `touch` has run
    while not canary.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert canary.exists()


def test_hostile_template_in_a_gguf_runs_nothing(tmp_path):
    """End to end: a checkpoint whose tokenizer_config.json carries the CVE-2024-34359
    payload converts (the template is data), loads, and then fails to render, in the API
    and in `cpuq chat`, without running the command in it."""
    import subprocess
    import sys

    from make_tiny_checkpoint import make_tiny_checkpoint

    canary = tmp_path / "canary"
    src = make_tiny_checkpoint(tmp_path / "ckpt", arch="qwen2", dtype="f32", seed=5)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = ESCAPES[0].replace("{canary}", str(canary))
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    path = cpuq.convert(src, tmp_path / "hostile.gguf", "q8_0")
    with cpuq.load(path, n_ctx=64) as m:
        with pytest.raises(FormatError, match=r"^chat template: line 1: ") as e:
            m.chat(USER, max_tokens=2)
        assert "\n" not in str(e.value)
    cli = Path(sys.executable).with_name("cpuq")
    r = subprocess.run([str(cli), "chat", str(path), "-c", "64"], input="Hi\n", capture_output=True, text=True,
                       timeout=120)
    # the turn fails and chat goes on; over a pipe, the exit code then says a reply is missing
    assert r.returncode == 2 and "error: chat template: line 1: " in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert not canary.exists()


def test_a_template_that_does_not_compile_fails_chat_not_load(tmp_path):
    """The template compiles on first use (jinja2 is ~0.1 s of a load): such a file loads
    and generates, Model.chat raises the FormatError, and `cpuq chat` stops with it before
    reading any input (one error line for two input lines, exit 2)."""
    import sys

    from make_tiny_checkpoint import make_tiny_checkpoint

    src = make_tiny_checkpoint(tmp_path / "ckpt", arch="qwen2", dtype="f32", seed=5)
    config = json.loads((src / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }}"  # no endfor
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    path = cpuq.convert(src, tmp_path / "broken.gguf", "q8_0")
    with cpuq.load(path, n_ctx=64) as m:
        assert m._template is None  # not compiled by the load
        "".join(m.generate([1, 2, 3], max_tokens=2, temperature=0, ignore_eos=True))
        assert m.finish_reason == "length" and m.timings.generated_tokens == 2
        with pytest.raises(FormatError, match=r"^chat template: line 1: "):
            m.chat(USER, max_tokens=2)
    cli = Path(sys.executable).with_name("cpuq")
    r = subprocess.run([str(cli), "chat", str(path), "-c", "64"], input="Hi\nHello\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert [line for line in r.stderr.splitlines() if "error:" in line] == \
        [line for line in r.stderr.splitlines() if line.startswith("error: chat template: line 1: ")], r.stderr
    assert r.stderr.count("error:") == 1, r.stderr
