"""Fuse the matmuls that read the same activation into one matmul and a split: attention's q/k/v, in an OpenVINO IR.

Why: at batch 1 the `cpu` engine's time is in 211 small matmul kernels a step (7 a layer + the LM head), each with a
fixed cost (dispatch, threads, dynamic activation quantization) that a 576x192 weight cannot amortize; on this
AVX-512 CPU (no AMX) OpenVINO runs q/k/v as three kernels. One [q;k;v] matmul a layer instead of three cut the
q/k/v kernels' time by ~40% at batch 1 (SmolLM2-135M int4, OpenVINO's per-op profile). The result is exact: every
output element is the same dot product as before, and weight compression is per output row, so concatenating rows
keeps every scale.

The MLP's gate/up pair could be fused the same way, and is not by default (`min_group=3`): the split then stands
between the matmul and the SiLU that OpenVINO otherwise fuses into the gate kernel, and batch 32 measured slower.

Works on the IR as optimum-intel writes it: a MatMul(x, W, transpose_b) whose W is a Constant or a decompression
chain (Convert / Subtract / Multiply / Reshape over Constants: NNCF's int8 and int4 formats), every Constant in it
either per output row (concatenated) or shared (equal in all branches).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

_CHAIN_OPS = {"Convert", "Subtract", "Multiply", "Reshape"}


class _Unfusable(Exception):
    pass


def _weight_chain_ok(node) -> bool:
    kind = node.get_type_name()
    if kind == "Constant":
        return True
    if kind not in _CHAIN_OPS:
        return False
    return all(_weight_chain_ok(i.get_source_output().get_node()) for i in node.inputs())


def _candidates(model, min_group: int) -> list[list]:
    """Groups of >= min_group MatMuls with transpose_b that read one output port and have constant-foldable weights."""
    groups = defaultdict(list)
    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul":
            continue
        attrs = op.get_attributes()
        weight = op.input(1).get_source_output().get_node()
        if attrs.get("transpose_a") or not attrs.get("transpose_b") or not _weight_chain_ok(weight):
            continue
        if op.get_input_partial_shape(1).rank.get_length() != 2:
            continue
        source = op.input(0).get_source_output()
        groups[(source.get_node().get_name(), source.get_index())].append(op)
    return [ops for ops in groups.values() if len(ops) >= min_group]


def _concat_constants(nodes: list, rows: list[int]):
    import openvino as ov

    first = nodes[0]
    shapes = [tuple(n.get_output_shape(0)) for n in nodes]
    kind = first.get_output_element_type(0)
    if any(n.get_output_element_type(0) != kind for n in nodes):
        raise _Unfusable("constants of different types")
    # per output row: [rows, k] weights, [rows, groups, group] int4 weights, [rows, 1] / [rows, groups, 1] scales
    # (a 1-D constant broadcasts along the last axis, so it is never per row)
    per_row = all(len(s) >= 2 and s[0] == r for s, r in zip(shapes, rows, strict=True))
    if per_row and any(r != 1 for r in rows):
        if any(s[1:] != shapes[0][1:] for s in shapes):
            raise _Unfusable("per-row constants of different widths")
        if any(np.prod(s) * kind.bitwidth % 8 for s in shapes):
            raise _Unfusable("a packed sub-byte constant that does not end on a byte")
        shape = (sum(rows), *shapes[0][1:])
        tensor = ov.Tensor(kind, ov.Shape(list(shape)))
        packed = np.concatenate([np.ascontiguousarray(n.data).reshape(-1).view(np.uint8) for n in nodes])
        target = tensor.data.reshape(-1).view(np.uint8)
        if target.size != packed.size:
            raise _Unfusable("packed constant sizes do not add up")
        target[:] = packed
        return ov.op.Constant(tensor).output(0)
    if all(s == shapes[0] for s in shapes) and all(np.array_equal(n.data, first.data) for n in nodes[1:]):
        return first.output(0)
    raise _Unfusable(f"constants {shapes} are neither per output row nor shared")


def _fuse_chain(nodes: list, rows: list[int]):
    """The fused counterpart of corresponding weight-chain nodes (one per branch): an output of the new graph."""
    from openvino import opset13 as ops

    kinds = {n.get_type_name() for n in nodes}
    if len(kinds) != 1:
        raise _Unfusable(f"branches differ: {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "Constant":
        return _concat_constants(nodes, rows)
    inputs = [[n.input(i).get_source_output().get_node() for n in nodes] for i in range(nodes[0].get_input_size())]
    if kind == "Convert":
        return ops.convert(_fuse_chain(inputs[0], rows), nodes[0].get_output_element_type(0)).output(0)
    if kind in ("Multiply", "Subtract"):
        make = ops.multiply if kind == "Multiply" else ops.subtract
        return make(_fuse_chain(inputs[0], rows), _fuse_chain(inputs[1], rows)).output(0)
    # Reshape to the 2-D weight [rows, k]
    shapes = [tuple(n.get_output_shape(0)) for n in nodes]
    if any(len(s) != 2 or s[1] != shapes[0][1] for s in shapes):
        raise _Unfusable(f"reshape to {shapes}")
    fused = _fuse_chain(inputs[0], rows)
    return ops.reshape(fused, ops.constant(np.array([sum(rows), shapes[0][1]], dtype=np.int64)), False).output(0)


def fuse_matmuls(model, min_group: int = 3) -> dict[str, int]:
    """Fuse, in place, every group of >= min_group matmuls sharing an input; returns {"groups", "matmuls"} fused."""
    import openvino as ov
    from openvino import opset13 as ops

    fused_groups = fused_matmuls = 0
    for group in _candidates(model, max(2, min_group)):
        weights = [op.input(1).get_source_output().get_node() for op in group]
        rows = [int(op.get_output_partial_shape(0)[-1].get_length()) for op in group]
        try:
            weight = _fuse_chain(weights, rows)
        except (_Unfusable, RuntimeError):  # RuntimeError: OpenVINO's shape inference refused a fused node
            continue
        k = group[0].get_input_partial_shape(1)[1]
        if weight.get_partial_shape() != ov.PartialShape([sum(rows), k]):
            continue  # a chain this does not understand: leave the group as it is
        source = group[0].input(0).get_source_output()
        matmul = ops.matmul(source, weight, transpose_a=False, transpose_b=True)
        matmul.set_friendly_name(group[0].get_friendly_name() + "/fused")
        split = ops.variadic_split(matmul, ops.constant(np.int64(-1)), ops.constant(np.array(rows, dtype=np.int64)))
        for index, op in enumerate(group):
            split.output(index).get_tensor().set_names(op.output(0).get_names())
            for target in list(op.output(0).get_target_inputs()):
                target.replace_source_output(split.output(index))
        fused_groups += 1
        fused_matmuls += len(group)
    if fused_groups:
        model.validate_nodes_and_infer_types()
    return {"groups": fused_groups, "matmuls": fused_matmuls}


def fuse_ir(xml: Path, min_group: int = 3) -> dict[str, int]:
    """Fuse the IR at `xml` (its .bin beside it) and rewrite it; returns what fuse_matmuls fused."""
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    info = fuse_matmuls(model, min_group)
    if info["groups"]:
        tmp = xml.with_name(f".{xml.stem}.fused.xml")
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        del model
        tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
        tmp.replace(xml)
    return info
