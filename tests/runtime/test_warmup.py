"""A cold start's step kernels compiled by a child process (runtime.warmup): the parent's
first one-token step loads them from the cache instead of compiling them, and a warm
cache starts no child."""
from __future__ import annotations

import json
import os
import subprocess
import sys

# Records what this process compiles (Numba's compile event fires only for a real
# compilation, not for a load from the cache) around a load and a 2-token generation.
_RUN = r"""
import json, sys
from numba.core import event
compiled = []
class Listener(event.Listener):
    def on_start(self, ev): compiled.append(ev.data["dispatcher"].py_func.__qualname__)
    def on_end(self, ev): pass
event.register("numba:compile", Listener())
import cpuq
m = cpuq.load(sys.argv[1], n_ctx=64, n_threads=1)
child = m._paths.step_compiler is not None
first_run = m.first_run
ids = list(m.generate([1], max_tokens=2, temperature=0))
m.close()
print(json.dumps({"child": child, "first_run": first_run, "compiled": compiled, "ids": ids}))
"""


def _run(demo, cache, helper="1") -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache), CPUQ_JIT_HELPER=helper)
    r = subprocess.run([sys.executable, "-c", _RUN, str(demo)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.splitlines()[-1])


def test_cold_cache_steps_come_from_the_child(demo, tmp_path):
    cold = _run(demo, tmp_path / "cache")
    assert cold["child"]
    # the model file's stages bound to kernels.step (runtime.stages) and what they call
    step_kernels = {"blocks_dense", "block_step", "attention_step", "mlp_step", "linear3", "attend", "products",
                    "matvec3", "attention"}
    assert not step_kernels & set(cold["compiled"]), cold["compiled"]
    assert len(list((tmp_path / "cache" / "cpuq-warm").iterdir())) == 1  # the child's marker
    warm = _run(demo, tmp_path / "cache")
    assert not warm["child"] and not warm["compiled"]
    assert warm["ids"] == cold["ids"]


def test_turned_off(demo, tmp_path):
    """CPUQ_JIT_HELPER=0: no child; this process compiles the step kernels itself, then marks
    the cache warm, so the next run neither starts a child nor says "first run"."""
    off = _run(demo, tmp_path / "cache", helper="0")
    assert not off["child"] and off["first_run"] and {"blocks_dense", "attention_step"} <= set(off["compiled"])
    assert len(list((tmp_path / "cache" / "cpuq-warm").iterdir())) == 1
    again = _run(demo, tmp_path / "cache")
    assert not again["child"] and not again["first_run"] and not again["compiled"]
