"""Lossless size reductions of an exported ONNX graph (`compact_onnx_`, run by `onnx_export.finalize_onnx_`).

What the PyTorch exporter leaves that onnxruntime does not need, and what can be stored in fewer bytes exactly:
- per-node metadata (stack traces, name scopes), the exporter's graph metadata (the ExportedProgram signature, 66
  KB on MiniLM), doc strings and the `value_info` shape annotations (onnxruntime re-infers shapes at load);
- `Constant` nodes become initializers, `Identity` nodes are bypassed, identical initializers are shared; nodes
  that only reshuffle initializers (Gather of a quantizer's scalar, Transpose of weight codes, exact Casts,
  Reshape / Unsqueeze / Squeeze, Slice: with a static sequence length the position table shrinks to the rows the
  graph can read) are evaluated in numpy and replaced by their result where it is no larger
  (onnxruntime folds the same nodes at load: the same values);
- all-zero optional zero points (MatMulIntegerToFloat's, where zero is the default) and MatMulNBits' all-8 zero
  points (the default) are dropped;
- GatherBlockQuantized tables (written as int8 by the exporter) are stored as INT4 (codes in [-8, 7]);
- float32 initializers whose values are all float16 values (weight and table scales and quantized layers' biases,
  rounded at calibration with `PTQConfig.half_params`) are stored as float16 behind a `Cast` to float; int64
  ones that fit int32 likewise as int32. onnxruntime's constant folding (basic level, on by default) turns each
  such Cast back into a float32 / int64 initializer at load: the same values as before, no Cast at run time;
- value and initializer names are replaced by short deterministic ones (graph inputs and outputs keep theirs; node
  names are dropped): the exporter's `model.backbone.model.encoder.layer.5...` names cost ~20 KB on MiniLM.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Any

import numpy as np


_ZERO_DEFAULT = {"MatMulIntegerToFloat": (4, 5), "MatMulInteger": (2, 3), "DynamicQuantizeMatMul": (4,)}
_CAST_MIN_ELEMENTS = 16  # below this a Cast node costs more bytes than the narrower storage saves


def compact_onnx_(model, half: bool = True, short_names: bool = True) -> dict[str, int]:
    """Apply the reductions above in place to a ModelProto; returns counts of what changed."""
    g = model.graph
    stats: dict[str, int] = collections.Counter()
    for node in g.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del g.value_info[:]
    for props in (g.metadata_props, model.metadata_props):
        keep = [p for p in props if not p.key.startswith("pkg.torch.")]
        del props[:]
        props.extend(keep)
    g.doc_string = model.doc_string = ""
    if any(a.type in (a.GRAPH, a.GRAPHS) for n in g.node for a in n.attribute):
        return dict(stats)  # subgraphs may refer to outer names: only the metadata is stripped
    stats["constants_folded"] = _fold_constants_(g)
    stats["identities_removed"] = _bypass_identities_(g)
    stats["constant_nodes_evaluated"] = _evaluate_constant_nodes_(g)
    stats["default_zero_points_dropped"] = _drop_default_zero_points_(g)
    stats["int4_tables"] = _int4_gather_tables_(g)
    stats["initializers_shared"] = _share_duplicates_(g)
    _drop_unused_initializers_(g)
    if half:
        stats["narrowed_initializers"] = _narrow_initializers_(g)
    if short_names:
        _shorten_names_(g)
    return dict(stats)


def _array(t) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(t)


def _fold_constants_(g) -> int:
    """`Constant` nodes (tensor / int(s) / float(s) values) -> initializers of the same name."""
    from onnx import helper, numpy_helper

    keep, done = [], 0
    for node in g.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.attribute) != 1:
            keep.append(node)
            continue
        a = node.attribute[0]
        if a.name == "value":
            t = type(a.t)()
            t.CopyFrom(a.t)
        elif a.name in ("value_int", "value_ints", "value_float", "value_floats"):
            v = helper.get_attribute_value(a)
            t = numpy_helper.from_array(np.array(v, dtype=np.int64 if "int" in a.name else np.float32))
        else:
            keep.append(node)
            continue
        t.name = node.output[0]
        g.initializer.append(t)
        done += 1
    del g.node[:]
    g.node.extend(keep)
    return done


def _rename_inputs_(g, mapping: dict[str, str]) -> None:
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]


def _bypass_identities_(g) -> int:
    outputs = {o.name for o in g.output}
    mapping, keep = {}, []
    for node in g.node:
        if node.op_type == "Identity" and node.domain in ("", "ai.onnx") and node.output[0] not in outputs:
            src = node.input[0]
            mapping[node.output[0]] = mapping.get(src, src)
        else:
            keep.append(node)
    del g.node[:]
    g.node.extend(keep)
    _rename_inputs_(g, mapping)
    return len(mapping)


_PLAIN_TYPES = {1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13}  # float, (u)int8-64, bool, float16, double


def _evaluate(node, args: list[np.ndarray]) -> np.ndarray | None:
    """numpy value of one shape / index / cast node on constant inputs, or None (not handled, or inexact)."""
    from onnx import helper

    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "Gather":
        return np.take(args[0], args[1], axis=attrs.get("axis", 0))
    if op == "Transpose":
        return np.transpose(args[0], attrs.get("perm"))
    if op in ("Cast", "CastLike"):
        if "saturate" in attrs and attrs["saturate"] != 1:
            return None
        dtype = helper.tensor_dtype_to_np_dtype(attrs["to"]) if op == "Cast" else args[1].dtype
        out = args[0].astype(dtype)
        return out if np.array_equal(out.astype(args[0].dtype), args[0]) else None  # exact casts only
    if op == "Reshape" and not attrs.get("allowzero", 0):
        shape = [args[0].shape[i] if d == 0 else int(d) for i, d in enumerate(args[1].tolist())]
        return args[0].reshape(shape)
    if op == "Slice":  # e.g. position_ids[:, :T] of a graph with a static sequence length
        axes = args[3].tolist() if len(args) > 3 else list(range(len(args[1])))
        steps = args[4].tolist() if len(args) > 4 else [1] * len(axes)
        index = [slice(None)] * args[0].ndim
        for axis, start, end, step in zip(axes, args[1].tolist(), args[2].tolist(), steps, strict=True):
            index[int(axis)] = slice(int(start), int(end), int(step))  # numpy clamps as ONNX does
        return args[0][tuple(index)]
    if op == "Unsqueeze":
        return np.expand_dims(args[0], tuple(int(a) for a in args[1].tolist()))
    if op == "Squeeze":
        return np.squeeze(args[0], tuple(int(a) for a in args[1].tolist()) if len(args) > 1 else None)
    return None


def _evaluate_constant_nodes_(g) -> int:
    """Replace nodes whose inputs are all initializers by their value (not larger than the inputs)."""
    from onnx import numpy_helper

    inits = {t.name: t for t in g.initializer}
    outputs = {o.name for o in g.output}
    keep, done = [], 0
    for node in g.node:
        ins = [inits.get(i) for i in node.input]
        ok = (
            node.domain in ("", "ai.onnx")
            and len(node.output) == 1
            and node.output[0] not in outputs
            and ins
            and all(t is not None and t.data_type in _PLAIN_TYPES for t in ins)
        )
        out = _evaluate(node, [_array(t) for t in ins]) if ok else None
        if out is None or out.nbytes > sum(_array(t).nbytes for t in ins[:1]) + 16:
            keep.append(node)
            continue
        t = numpy_helper.from_array(np.array(out, order="C"), node.output[0])  # (ascontiguousarray makes 0-d 1-d)
        g.initializer.append(t)
        inits[t.name] = t
        done += 1
    del g.node[:]
    g.node.extend(keep)
    return done


def _drop_default_zero_points_(g) -> int:
    inits = {t.name: t for t in g.initializer}
    done = 0
    for node in g.node:
        slots = _ZERO_DEFAULT.get(node.op_type, ())
        if node.op_type == "MatMulNBits" and len(node.input) > 3:
            t = inits.get(node.input[3])
            bits = next((a.i for a in node.attribute if a.name == "bits"), 4)
            if t is not None and bits == 4 and t.data_type == 2 and np.all(_array(t) == 0x88):  # uint8: nibbles 8
                node.input[3] = ""
                done += 1
        for i in slots:
            t = inits.get(node.input[i]) if i < len(node.input) else None
            if t is not None and not np.any(_array(t)):
                node.input[i] = ""
                done += 1
        while node.input and node.input[-1] == "":  # trailing optional inputs may be omitted
            node.input.pop()
    return done


def int4_tensor(name: str, a: np.ndarray):
    """An INT4 TensorProto of integer values in [-8, 7], packed two per byte in raw_data (element 0 in the low
    nibble): half a byte per value (onnx.helper.make_tensor's int32_data form costs ~1.5 bytes a byte pair)."""
    from onnx import TensorProto, helper

    u = np.asarray(a).reshape(-1).astype(np.int16) & 0xF
    if u.size % 2:
        u = np.concatenate([u, np.zeros(1, dtype=u.dtype)])
    packed = (u[0::2] | (u[1::2] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, list(np.shape(a)), packed.tobytes(), raw=True)


def _int4_gather_tables_(g) -> int:
    from onnx import TensorProto

    inits = {t.name: t for t in g.initializer}
    done = 0
    for node in g.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        t = inits.get(node.input[0])
        if t is None or t.data_type != TensorProto.INT8:
            continue
        a = _array(t)
        if a.size and (a.min() < -8 or a.max() > 7):
            raise ValueError(f"GatherBlockQuantized table {t.name!r} has codes outside [-8, 7]")
        t.CopyFrom(int4_tensor(t.name, a))
        done += 1
    return done


def _share_duplicates_(g) -> int:
    seen: dict[Any, str] = {}
    mapping, keep = {}, []
    for t in g.initializer:
        a = _array(t)
        key = (t.data_type, tuple(t.dims), hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest())
        if key in seen:
            mapping[t.name] = seen[key]
        else:
            seen[key] = t.name
            keep.append(t)
    if mapping:
        del g.initializer[:]
        g.initializer.extend(keep)
        _rename_inputs_(g, mapping)
    return len(mapping)


def _drop_unused_initializers_(g) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def _narrow_initializers_(g) -> int:
    """float32 -> float16 and int64 -> int32 storage where every value is exact, behind a Cast (folded at load)."""
    from onnx import TensorProto, helper, numpy_helper

    graph_inputs = {i.name for i in g.input}
    casts, done = [], 0
    for t in g.initializer:
        if t.name in graph_inputs or int(np.prod(t.dims)) < _CAST_MIN_ELEMENTS:
            continue
        if t.data_type == TensorProto.FLOAT:
            a = _array(t)
            n = a.astype(np.float16)
            exact = np.all(np.isfinite(a)) and np.array_equal(n.astype(np.float32), a)
            to = TensorProto.FLOAT
        elif t.data_type == TensorProto.INT64:
            a = _array(t)
            n = a.astype(np.int32)
            exact = np.array_equal(n.astype(np.int64), a)
            to = TensorProto.INT64
        else:
            continue
        if not exact:
            continue
        name = t.name
        narrow = numpy_helper.from_array(n, f"{name}__narrow")
        t.CopyFrom(narrow)
        casts.append(helper.make_node("Cast", [narrow.name], [name], to=to))
        done += 1
    if casts:
        nodes = list(g.node)
        del g.node[:]
        g.node.extend(casts + nodes)
    return done


def _short(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    s = ""
    while True:
        i, r = divmod(i, len(digits))
        s = digits[r] + s
        if i == 0:
            return s


def _shorten_names_(g) -> None:
    """Deterministic short names (order of appearance) for initializers and intermediate values; graph inputs and
    outputs keep their names, nodes lose theirs."""
    kept = {i.name for i in g.input} | {o.name for o in g.output}
    mapping: dict[str, str] = {}
    counter = 0

    def new_name(old: str) -> str:
        nonlocal counter
        if old in kept or old == "":
            return old
        if old not in mapping:
            while (s := _short(counter)) in kept:
                counter += 1
            mapping[old] = s
            counter += 1
        return mapping[old]

    for t in g.initializer:
        t.name = new_name(t.name)
    for node in g.node:
        node.name = ""
        for i, name in enumerate(node.input):
            node.input[i] = new_name(name)
        for i, name in enumerate(node.output):
            node.output[i] = new_name(name)
