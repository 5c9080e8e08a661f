"""The model files (cpuq.models) and how runtime.stages binds their stages to each path."""
from __future__ import annotations

import pytest

from cpuq.errors import UnsupportedError
from cpuq.kernels import step
import dis

from cpuq.models import dense, hybrid, moe
from cpuq.runtime import chunk, gpu, stages


def test_every_path_has_the_ops_the_stages_name():
    """The decode step and the prompt chunk bind every model file's stages (bind checks
    every global a stage loads against the ops) and offer the same op names; the GPU binds
    the dense and MoE files and refuses the hybrids' DeltaNet, naming the op it lacks."""
    assert set(step.OPS) == set(chunk.OPS) and set(gpu.OPS) < set(chunk.OPS)
    for ops, path in ((step.OPS, "step"), (chunk.OPS, "chunk"), (gpu.OPS, "gpu")):
        bound = stages.bind(dense, ops, path)
        assert bound.block.__qualname__ == f"block_{path}"
        assert bound.scope["linear3"] is ops["linear3"]
        assert stages.bind(moe, ops, path).scope["experts"] is ops["experts"]
    for ops, path in ((step.OPS, "step"), (chunk.OPS, "chunk")):
        assert stages.bind(hybrid, ops, path).scope["delta_rule"] is ops["delta_rule"]
    with pytest.raises(UnsupportedError, match="hybrid.deltanet needs .*which the gpu path lacks"):
        stages.bind(hybrid, gpu.OPS, "gpu")


def _named(module, op: str) -> bool:
    return any(i.opname == "LOAD_GLOBAL" and i.argval == op for f in module.STAGES for i in dis.get_instructions(f))


@pytest.mark.parametrize("missing", sorted(chunk.OPS))
def test_a_path_without_an_op_refuses_the_model(missing):
    ops = {k: v for k, v in chunk.OPS.items() if k != missing}
    module = next(m for m in (dense, moe, hybrid) if _named(m, missing))
    assert _named(module, missing)
    with pytest.raises(UnsupportedError, match=f"needs {missing}, which the partial path lacks"):
        stages.bind(module, ops, "partial")


def test_layer_fields_are_the_tensor_table():
    assert dense.Layer._fields == tuple(t.field for t in dense.TENSORS)
    assert len({t.gguf for t in dense.TENSORS}) == len({t.hf for t in dense.TENSORS}) == len(dense.TENSORS)


def test_layer_at_addresses_matrices_and_vectors_in_table_order():
    """The decode step's view of a block (runtime.stages._layer_at_source): the j-th matrix
    of the table is the j-th (offset, rows, bytes) of the StepPack, vectors likewise."""
    src = stages._layer_at_source(dense)
    matrices = [t.field for t in dense.TENSORS if t.is_matrix]
    vectors = [t.field for t in dense.TENSORS if not t.is_matrix]
    args = src.split("Layer(", 1)[1].rsplit(")", 1)[0]
    for j, name in enumerate(matrices):
        assert f"p.at[il, {j}]" in args and f"p.types[il, {j}]" in args
    assert args.count("p.vectors[") == len(vectors)
