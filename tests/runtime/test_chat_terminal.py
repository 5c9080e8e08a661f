"""`cpuq chat` in a real terminal: the interactive loop (prompt, streamed reply, stats
line, Ctrl-C, /reset, /exit) driven through tmux, whose pane is a pseudo-terminal like a
user's, so stdin.isatty() is true and Ctrl-C is a real SIGINT from the terminal driver.

The model is the demo (SmolLM2-135M-Instruct Q4_1) at temperature 0, so replies are
deterministic. tmux runs as a private server (-L, a unique socket name) started with
remain-on-exit, so the pane stays inspectable after the program ends; the server is killed
in a finally. Every wait polls capture-pane until a condition on the screen holds (no fixed
sleeps); a timeout fails with the screen as it was.

Skips when tmux, the `cpuq` script next to this Python, or the demo model is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import cpuq
from cpuq.demo import demo_model_path

CPUQ = Path(sys.executable).with_name("cpuq")
ROOT = Path(__file__).resolve().parents[2]
STATS = re.compile(r"^\[(\d+) tokens, [\d.]+ tok/s; prompt (\d+) tokens, [\d.]+ tok/s\](.*)$")

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed"),
              pytest.mark.skipif(not CPUQ.exists(), reason=f"{CPUQ} missing (pip install -e .)")]


class Terminal:
    """One tmux pane (120 x 40) on a private tmux server, running `command`."""

    def __init__(self, command: str, where: Path):
        self.socket = f"cpuq-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.conf = where / "tmux.conf"
        # remain-on-exit from the server's start, so even a program that dies at once
        # leaves its pane (and last screen) behind.
        self.conf.write_text("set -g remain-on-exit on\nset -g history-limit 20000\n")
        self.target = "chat"
        self.tmux("new-session", "-d", "-s", self.target, "-x", "120", "-y", "40", "-c", str(ROOT), command)

    def tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-L", self.socket, "-f", str(self.conf), *args],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, f"tmux {' '.join(args)}: {r.stderr}"
        return r.stdout

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=10)

    def screen(self) -> list[str]:
        """The whole pane, scrollback included, wrapped lines joined, trailing blanks dropped."""
        lines = [line.rstrip() for line in self.tmux("capture-pane", "-p", "-J", "-S", "-", "-t", self.target)
                 .splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        return lines

    def dead(self) -> tuple[bool, str]:
        """(has the program exited, its exit status)."""
        dead, status = self.tmux("list-panes", "-t", self.target, "-F", "#{pane_dead} #{pane_dead_status}").split(" ")
        return dead == "1", status.strip()

    def wait_for(self, what: str, done, timeout: float = 30.0) -> list[str]:
        """Poll the screen until done(lines) is true; return the lines."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if done(lines):
                return lines
            if time.monotonic() > deadline or self.dead()[0]:
                pytest.fail(f"waited {timeout:.0f} s for {what}; dead={self.dead()}; screen:\n"
                            + "\n".join(lines[-40:]))
            time.sleep(0.1)

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", self.target, "-l", text)  # -l: literally, no key names
        self.tmux("send-keys", "-t", self.target, "Enter")

    def key(self, key: str) -> None:
        self.tmux("send-keys", "-t", self.target, key)


def idle(lines: list[str]) -> bool:
    """The program waits at an empty `>>> ` prompt."""
    return bool(lines) and lines[-1] == ">>>"


def count(lines: list[str], pattern: str) -> int:
    return sum(1 for line in lines if re.search(pattern, line))


def ask(term: Terminal, question: str, timeout: float = 60.0) -> tuple[str, re.Match]:
    """Send one user message, wait for the reply's stats line and the next prompt; return
    (reply text, the stats line's match)."""
    before = count(term.screen(), STATS.pattern)
    term.type(question)
    lines = term.wait_for(f"the reply to {question!r}",
                          lambda ls: count(ls, STATS.pattern) > before and idle(ls), timeout)
    start = max(i for i, line in enumerate(lines) if line == f">>> {question}")
    end = next(i for i in range(start + 1, len(lines)) if STATS.match(lines[i]))
    return "\n".join(lines[start + 1:end]), STATS.match(lines[end])


def exits_cleanly(term: Terminal, after: str) -> None:
    """The program ends within 20 s, with status 0 and no traceback or error on the screen."""
    deadline = time.monotonic() + 20
    while not term.dead()[0]:
        assert time.monotonic() < deadline, f"cpuq chat still running after {after}:\n" + "\n".join(term.screen())
        time.sleep(0.1)
    # tmux records the exit status a moment after the pane dies, and on a loaded machine
    # sometimes not at all; when it has one it must be 0, and the screen must be clean.
    status_deadline = time.monotonic() + 5
    while term.dead()[1] == "" and time.monotonic() < status_deadline:
        time.sleep(0.1)
    assert term.dead()[1] in ("0", ""), term.dead()
    assert not any("Traceback" in line or line.startswith("error:") for line in term.screen())


@pytest.fixture(scope="module")
def demo_model() -> Path:
    try:
        path = demo_model_path()
    except cpuq.InputError as e:
        pytest.skip(str(e))
    # Compile (or load from Numba's on-disk cache) the kernels here, with the same greedy
    # path the CLI takes, so the waits below time the chat and not a cold compile (~30 s on
    # 2 cores); the CLI process then loads the cached machine code.
    with cpuq.load(path, n_ctx=64) as m:
        "".join(m.chat([{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0))
    return path


def test_interactive_chat_session(demo_model, tmp_path):
    term = Terminal(f"{CPUQ} chat --temperature 0 --seed 1 -n 2000", tmp_path)
    try:
        lines = term.wait_for("the first prompt", idle, timeout=60)
        banner = " ".join(lines[:-1])  # rich wraps it at the pane's width
        assert banner.startswith(f"{demo_model.name}: llama, ") and "Ctrl-C stops a reply" in banner, banner

        # Two turns: the second only makes sense with the first in the context, and only the
        # new part of the conversation is evaluated (KV cache reuse: fewer prompt tokens than
        # the first turn's, which include the template's default system message).
        reply1, stats1 = ask(term, "What is the capital of France?")
        assert "Paris" in reply1, reply1
        assert int(stats1[1]) > 0 and stats1[3] == "", stats1[0]
        reply2, stats2 = ask(term, "And of Germany?")
        assert "Berlin" in reply2, reply2
        assert int(stats2[2]) < int(stats1[2]), (stats1[0], stats2[0])

        # Ctrl-C in the middle of a long reply stops the reply, not the program. (At
        # temperature 0 this model's story falls into a loop and never ends by itself.)
        story = "Write a long story about a dragon."
        stopped = count(term.screen(), r"\(stopped\)")
        term.type(story)

        def reply_words(ls):
            at = max((i for i, line in enumerate(ls) if line == f">>> {story}"), default=None)
            return 0 if at is None else len(" ".join(ls[at + 1:]).split())
        term.wait_for("30 words of the story", lambda ls: reply_words(ls) >= 30, timeout=60)
        term.key("C-c")
        lines = term.wait_for("the stopped reply and a new prompt",
                              lambda ls: count(ls, r"\(stopped\)") > stopped and idle(ls), timeout=20)
        stats = STATS.match(next(line for line in reversed(lines) if STATS.match(line)))
        # (each word on the screen took at least one token)
        assert stats[3] == " (stopped)" and 30 <= int(stats[1]) < 2000, stats[0]
        assert not term.dead()[0]
        # ... and the conversation goes on, the partial reply in the context.
        reply, _ = ask(term, "What is the capital of Italy?")
        assert "Rome" in reply, reply

        # Ctrl-C at the prompt says how to quit and keeps going.
        hints = count(term.screen(), r"^\(Ctrl-D or /exit to quit\)$")
        term.key("C-c")
        term.wait_for("the quit hint", lambda ls: count(ls, r"^\(Ctrl-D or /exit to quit\)$") > hints and idle(ls))

        # /reset forgets the conversation and the cache: the first question again gets the
        # same answer from a fully evaluated prompt of the same length as the first time.
        term.type("/reset")
        term.wait_for("(new conversation)", lambda ls: ls[-3:] == [">>> /reset", "(new conversation)", ">>>"])
        reply3, stats3 = ask(term, "What is the capital of France?")
        assert reply3 == reply1 and stats3[2] == stats1[2], (reply1, reply3, stats1[0], stats3[0])

        # /exit ends the program with status 0.
        term.type("/exit")
        exits_cleanly(term, "/exit")
        print("\n".join(term.screen()))
    finally:
        term.kill()


def test_ctrl_c_in_prefill_resize_and_eof(demo_model, tmp_path):
    """Ctrl-C while a long prompt is being evaluated stops that turn (no reply, the message
    dropped; the program and the conversation go on); a terminal resize mid-reply changes nothing; Ctrl-D (EOF)
    at the prompt ends the program with status 0."""
    term = Terminal(f"{CPUQ} chat --temperature 0 -n 48", tmp_path)
    try:
        term.wait_for("the first prompt", idle, timeout=60)
        # ~2,800 tokens: ~10 s of prompt evaluation here, so Ctrl-C lands inside it.
        words = "the quick brown fox jumps over the lazy dog " * 310 + "finally"
        stopped = count(term.screen(), r"\(stopped")
        term.type(words)
        term.wait_for("the long message typed", lambda ls: any(line.endswith("finally") for line in ls), timeout=30)
        term.key("C-c")
        lines = term.wait_for("the stopped turn and a new prompt",
                              lambda ls: count(ls, r"\(stopped") > stopped and idle(ls), timeout=30)
        stats = STATS.match(next(line for line in reversed(lines) if STATS.match(line)))
        # no token was generated, so the message goes too: no empty assistant turn (after
        # which the next reply came out empty) and no 2,800 tokens of it in the context
        assert stats[1] == "0" and stats[3] == " (stopped before the reply; message dropped)", stats[0]
        reply, stats = ask(term, "What is the capital of France?")
        assert "Paris" in reply, reply
        # the prompt evaluated: the part of this turn past what the cache already holds (the
        # template's system message at least), a few dozen tokens and not the long message
        assert int(stats[2]) < 100, stats[0]

        # A resize (SIGWINCH to the program) in the middle of a reply.
        before = count(term.screen(), STATS.pattern)
        term.type("Write a long story about a dragon.")
        term.wait_for("the story to start", lambda ls: ls[-1] != ">>> Write a long story about a dragon.", timeout=30)
        term.tmux("resize-window", "-t", term.target, "-x", "70", "-y", "20")
        term.wait_for("the story's end", lambda ls: count(ls, STATS.pattern) > before and idle(ls), timeout=60)
        assert not term.dead()[0]

        term.key("C-d")
        exits_cleanly(term, "Ctrl-D")
    finally:
        term.kill()
