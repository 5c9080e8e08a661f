"""Write a calibration text from the Python standard library (pydoc_data.topics: the
language reference's topics, English technical prose, public domain-like PSF docs), so
calibration runs need nothing downloaded. Used for the README's compare table, where the
model is scored on a different text (tests/data/tempest.txt, Shakespeare).

    python tools/calibration_text.py OUT.txt [--chars 120000]

The topics are joined in sorted order and cut to --chars characters; their text follows
the Python version (3.11 for the README's numbers).
"""
from __future__ import annotations

from pathlib import Path

import pydoc_data.topics

from toolcli import ArgumentParser, ToolError, output_file, run


def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--chars", type=int, default=120_000)
    args = ap.parse_args(argv)
    if args.chars < 1:
        raise ToolError(f"--chars {args.chars}: expected a positive number")
    topics = pydoc_data.topics.topics
    text = "\n\n".join(topics[k] for k in sorted(topics))[:args.chars]
    with output_file(args.out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(text)} characters")


if __name__ == "__main__":
    run(main)
