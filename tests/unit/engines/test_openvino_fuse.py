"""engines/backends/openvino/fuse.py on hand-made OpenVINO graphs: q/k/v-like matmuls sharing an input, with fp32
weights and NNCF's int8 (asymmetric, per row) and int4 (symmetric, grouped) decompression chains. Fused or not, the
compiled model gives the same outputs."""

from __future__ import annotations

import numpy as np
import pytest

ov = pytest.importorskip("openvino")
from openvino import opset13 as ops  # noqa: E402

from compactlm.engines.backends.openvino.fuse import fuse_ir, fuse_matmuls  # noqa: E402

K = 64
GROUP = 16


def f32_weight(rng, rows):
    return ops.constant(rng.standard_normal((rows, K)).astype(np.float32))


def int8_weight(rng, rows):
    q = ops.constant(rng.integers(0, 256, (rows, K), dtype=np.uint8))
    zero = ops.constant(rng.integers(100, 156, (rows, 1), dtype=np.uint8))
    scale = ops.constant((rng.random((rows, 1)) * 0.02).astype(np.float16))
    centred = ops.subtract(ops.convert(q, np.float16), ops.convert(zero, np.float16))
    return ops.convert(ops.multiply(centred, scale), np.float32)


def int4_weight(rng, rows):
    tensor = ov.Tensor(ov.Type.i4, ov.Shape([rows, K // GROUP, GROUP]))
    tensor.data.reshape(-1).view(np.uint8)[:] = rng.integers(0, 256, tensor.byte_size, dtype=np.uint8)
    scale = ops.constant((rng.random((rows, K // GROUP, 1)) * 0.05).astype(np.float16))
    grouped = ops.multiply(ops.convert(ov.op.Constant(tensor), np.float16), scale)
    flat = ops.reshape(grouped, ops.constant(np.array([rows, K], dtype=np.int64)), False)
    return ops.convert(flat, np.float32)


def qkv_model(seed: int, make_weight, rows=(48, 16, 16), other=None):
    """x -> RMS-like scale -> len(rows) matmuls on the same input (transpose_b), each to its own result."""
    rng = np.random.default_rng(seed)
    x = ops.parameter([-1, -1, K], np.float32, name="x")
    hidden = ops.multiply(x, ops.constant(rng.random((1, 1, K)).astype(np.float32)))
    outputs = []
    for i, r in enumerate(rows):
        weight = (other if other is not None and i == len(rows) - 1 else make_weight)(rng, r)
        outputs.append(ops.result(ops.matmul(hidden, weight, transpose_a=False, transpose_b=True)))
    return ov.Model(outputs, [x], "qkv")


def run(model, x):
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return [np.asarray(v) for v in compiled(x).values()]


def count(model, kind):
    return sum(op.get_type_name() == kind for op in model.get_ordered_ops())


@pytest.mark.parametrize("make_weight", [f32_weight, int8_weight, int4_weight], ids=["fp32", "int8", "int4"])
def test_fused_qkv_gives_the_same_outputs(make_weight):
    x = np.random.default_rng(1).standard_normal((2, 5, K)).astype(np.float32)
    expected = run(qkv_model(0, make_weight), x)
    model = qkv_model(0, make_weight)
    assert fuse_matmuls(model) == {"groups": 1, "matmuls": 3}
    assert count(model, "MatMul") == 1 and count(model, "VariadicSplit") == 1
    got = run(model, x)
    assert [g.shape for g in got] == [(2, 5, 48), (2, 5, 16), (2, 5, 16)]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_pairs_are_left_alone_unless_asked():
    model = qkv_model(0, int4_weight, rows=(32, 32))
    assert fuse_matmuls(model) == {"groups": 0, "matmuls": 0}
    assert count(model, "MatMul") == 2
    assert fuse_matmuls(model, min_group=2) == {"groups": 1, "matmuls": 2}
    assert count(model, "MatMul") == 1


def test_branches_with_different_weight_formats_are_not_fused():
    x = np.random.default_rng(2).standard_normal((1, 3, K)).astype(np.float32)
    expected = run(qkv_model(3, int4_weight, other=int8_weight), x)
    model = qkv_model(3, int4_weight, other=int8_weight)
    assert fuse_matmuls(model) == {"groups": 0, "matmuls": 0}
    for g, e in zip(run(model, x), expected, strict=True):
        np.testing.assert_array_equal(g, e)


def test_a_shared_per_input_channel_constant_is_not_taken_for_a_per_row_one():
    """q/k/v as wide as the input (rows == k) whose weights are scaled by one [k] vector: shared, not per row."""
    channel = np.random.default_rng(7).random(K).astype(np.float32)

    def scaled_weight(rng, rows):
        return ops.multiply(f32_weight(rng, rows), ops.constant(channel))

    x = np.random.default_rng(8).standard_normal((1, 3, K)).astype(np.float32)
    expected = run(qkv_model(6, scaled_weight, rows=(K, K, K)), x)
    model = qkv_model(6, scaled_weight, rows=(K, K, K))
    assert fuse_matmuls(model) == {"groups": 1, "matmuls": 3}
    for g, e in zip(run(model, x), expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_fuse_ir_rewrites_the_files_and_keeps_the_weights_exact(tmp_path):
    xml = tmp_path / "openvino_model.xml"
    ov.save_model(qkv_model(4, f32_weight), str(xml), compress_to_fp16=False)
    x = np.random.default_rng(5).standard_normal((1, 4, K)).astype(np.float32)
    expected = run(ov.Core().read_model(str(xml)), x)
    assert fuse_ir(xml) == {"groups": 1, "matmuls": 3}
    fused = ov.Core().read_model(str(xml))
    assert count(fused, "MatMul") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["openvino_model.bin", "openvino_model.xml"]
    for g, e in zip(run(fused, x), expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-6, atol=1e-6)
