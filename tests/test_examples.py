"""The programs in examples/ run as documented (they need the demo model)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_embed_chat_example():
    from cpuq import CpuqError
    from cpuq.demo import demo_model_path
    try:
        demo_model_path()
    except CpuqError:
        pytest.skip("demo model not installed")
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "embed_chat.py")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "Berlin" in r.stdout and "(2, 49152)" in r.stdout
