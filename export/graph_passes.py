"""Generic rewrites of ONNX graphs, used by the exporters, the lowering and the quantizers.

Each pass edits a ModelProto in place. Passes that make nodes or initializers unused end
with `prune`, the one place that drops what nothing reads any more.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
from onnx import helper, numpy_helper


def gemm_to_matmul(model) -> int:
    """Rewrite Gemm(x, W) with an initializer W as MatMul(x, W or W.T) (+ Add bias).

    A one-token decode graph traces Linear on 2-D activations as Gemm (weight as stored,
    transB=1) where the prefill graph has MatMul with the transposed weight. Rewriting makes
    the two graphs hold byte-identical weights (so they can share one copy) and lets the
    quantizers, which take MatMul only, treat the decode graph like the prefill graph.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    done = 0
    for i, node in enumerate(list(g.node)):
        if node.op_type != "Gemm" or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        name = node.input[1] + ("_T" if attrs.get("transB", 0) else "")
        if name not in inits:
            g.initializer.append(numpy_helper.from_array((w.T if attrs.get("transB", 0) else w).copy(), name))
            inits[name] = g.initializer[-1]
        has_bias = len(node.input) > 2 and node.input[2]
        mm_out = node.output[0] + "_mm" if has_bias else node.output[0]
        new = [helper.make_node("MatMul", [node.input[0], name], [mm_out], name=node.name + "_matmul")]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [node.output[0]], name=node.name + "_bias"))
        pos = list(g.node).index(node)
        g.node.remove(node)
        for k, n in enumerate(new):
            g.node.insert(pos + k, n)
        done += 1
    prune(model)
    return done


def materialize_transposed_weights(model) -> int:
    """Replace MatMul(x, Transpose(W)) by MatMul(x, W') with W' = W.T stored as an initializer.

    optimum's tied-weight dedup feeds the lm_head MatMul through a Transpose of the
    embedding, which MatMulNBitsQuantizer skips (its B is not an initializer). Storing the
    transposed copy lets it become a 4-bit MatMulNBits; the fp32 table stays for the Gather,
    so the tie costs one 4-bit copy rather than the fp32 copy ORT would fold in at load.
    """
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    done = 0
    for node in g.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        t = producers.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        if perm not in (None, [1, 0]) or len(inits[t.input[0]].dims) != 2:
            continue
        name = t.output[0] + "_weight"
        if name not in inits:
            w = numpy_helper.to_array(inits[t.input[0]]).T.copy()
            g.initializer.append(numpy_helper.from_array(w, name))
            inits[name] = g.initializer[-1]
        node.input[1] = name
        done += 1
    prune(model)
    return done


def symbolic_dims(model: onnx.ModelProto) -> dict[str, list]:
    """Every value's shape from onnx shape inference: ints, symbolic names ("batch") or None.

    The passes below compare dims across values with it (a symbolic dim equals another only
    by name)."""
    g = onnx.shape_inference.infer_shapes(model).graph
    return {v.name: [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in v.type.tensor_type.shape.dim]
            for v in list(g.value_info) + list(g.input) + list(g.output)}


def _const_ints(model: onnx.ModelProto, name: str, producers: dict) -> list[int] | None:
    for init in model.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init).tolist()
    n = producers.get(name)
    if n is not None and n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
        return numpy_helper.to_array(n.attribute[0].t).tolist()
    return None


_RESHAPING = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")


def collapse_reshapes(model: onnx.ModelProto, dims: dict[str, list]) -> int:
    """Reshape(R(a), s2) → Reshape(a, s2) where R is a Reshape, Unsqueeze, Squeeze or Flatten:
    the lowering's packing Reshapes often follow the model's own, and ORT (1.32) leaves such
    chains in place, at ~0.3 µs a node. Returns how many Reshapes now skip their source."""
    producers = {o: n for n in model.graph.node for o in n.output}
    done = 0
    for n in model.graph.node:
        src = producers.get(n.input[0]) if n.op_type == "Reshape" else None
        if src is None or src.op_type not in _RESHAPING or src.domain not in ("", "ai.onnx"):
            continue
        s2 = _const_ints(model, n.input[1], producers)
        s1 = _const_ints(model, src.input[1], producers) if src.op_type == "Reshape" else []
        if s1 is None or s2 is None:
            continue
        if 0 in s1 and any(a.name == "allowzero" and a.i for a in src.attribute):
            continue  # a literal zero-size dim: leave it alone
        if 0 in s2 and any(a.name == "allowzero" and a.i for a in n.attribute):
            continue
        # A 0 in s2 copies a dim of the intermediate: safe where s1 copied it too, or where
        # shape inference shows a and the intermediate agree on that (symbolic) dim.
        a_dims, mid_dims = dims.get(src.input[0]), dims.get(src.output[0])
        def same(i: int) -> bool:
            if i < len(s1) and s1[i] == 0:
                return True
            return (a_dims is not None and mid_dims is not None and i < min(len(a_dims), len(mid_dims))
                    and a_dims[i] is not None and a_dims[i] == mid_dims[i])
        if any(v == 0 and not same(i) for i, v in enumerate(s2)):
            continue
        n.input[0] = src.input[0]
        done += 1
    return done


def unit_gathers_to_reshapes(model: onnx.ModelProto, dims: dict[str, list]) -> int:
    """Gather(x, scalar index) on an axis of static size 1 → Reshape that drops the axis.

    A one-token graph selects its only position with such Gathers (`x[:, 0]`); as a Reshape
    it aliases its input and `collapse_reshapes` can fold it into the Reshape before it.
    dims: shapes from shape inference (ints, symbolic names or None). Returns how many.
    """
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    done = 0
    for k, n in enumerate(list(g.node)):
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx"):
            continue
        index = next((i for i in g.initializer if i.name == n.input[1]), None)
        if index is None:
            c = producers.get(n.input[1])
            index = c.attribute[0].t if c is not None and c.op_type == "Constant" and c.attribute else None
        if index is None or list(index.dims) != [] or numpy_helper.to_array(index).item() not in (0, -1):
            continue
        shape = dims.get(n.input[0])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if not shape:
            continue
        axis %= len(shape)
        # Dims before the axis are copied (0); those after it must be known numbers.
        if shape[axis] != 1 or any(not isinstance(d, int) for d in shape[axis + 1:]):
            continue
        target = [0] * axis + list(shape[axis + 1:])
        if 0 in shape[axis + 1:]:
            continue  # a zero-size dim would read as "copy" in Reshape
        name = f"{n.name or n.output[0]}_shape"
        g.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        pos = list(g.node).index(n)
        g.node.remove(n)
        g.node.insert(pos, helper.make_node("Reshape", [n.input[0], name], list(n.output), name=n.name + "_reshape"))
        done += 1
    return done


def drop_identity_reshapes(model: onnx.ModelProto, dims: dict[str, list]) -> int:
    """Drop Reshapes whose output has the input's shape (`view(-1, C)` of a (B, C) tensor):
    onnxruntime keeps them when B is symbolic. dims: shapes from shape inference; a Reshape is
    an identity when both shapes are known and equal (numbers, or the same symbolic name), or
    when its target is (-1 or 0, d1, d2, ...) and the input is (?, d1, d2, ...). Returns how many."""
    g = model.graph
    outputs = {o.name for o in g.output}
    producers = {o: n for n in g.node for o in n.output}
    rename: dict[str, str] = {}
    keep = []

    def identity(n) -> bool:
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or n.output[0] in outputs:
            return False
        a, b = dims.get(n.input[0]), dims.get(n.output[0])
        if a and a == b and None not in a and not any(str(d).startswith("unk__") for d in a):
            return True
        target = _const_ints(model, n.input[1], producers)
        return bool(a and target and len(target) == len(a) and target[0] in (-1, 0) and 0 not in target[1:]
                    and all(isinstance(d, int) and d == t for d, t in zip(a[1:], target[1:])))

    for n in g.node:
        for k, v in enumerate(n.input):
            n.input[k] = rename.get(v, v)
        if identity(n):
            rename[n.output[0]] = n.input[0]
        else:
            keep.append(n)
    dropped = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(keep)
    return dropped


def _wiring(g: onnx.GraphProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    """The node that makes each value, and the nodes that read it."""
    producers = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producers, consumers


def gather_unit_rows(model: onnx.ModelProto, dims: dict[str, list]) -> int:
    """Unsqueeze(Gather(table, Reshape(ids, [-1])), [1]) → Gather(table, ids) for ids (B, 1).

    The one-token step embeds `input_ids.reshape(-1)` and puts the axis back (`[:, None]`);
    Gather of the (B, 1) ids gives that (B, 1, D) directly: two nodes fewer per token.
    dims: shapes from shape inference. Returns how many.
    """
    g = model.graph
    producers, users = _wiring(g)
    outputs = {o.name for o in g.output}
    drop, done = set(), 0
    for n in g.node:
        if n.op_type != "Unsqueeze" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            continue
        gather = producers.get(n.input[0])
        if (gather is None or gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx")
                or any(a.name == "axis" and a.i != 0 for a in gather.attribute)
                or len(users.get(gather.output[0], [])) != 1 or gather.output[0] in outputs):
            continue
        flat = producers.get(gather.input[1])
        if flat is None or flat.op_type != "Reshape" or _const_ints(model, flat.input[1], producers) != [-1]:
            continue
        ids = dims.get(flat.input[0])
        if not ids or len(ids) != 2 or ids[1] != 1 or _const_ints(model, n.input[1], producers) != [1]:
            continue
        gather.input[1] = flat.input[0]
        gather.output[0] = n.output[0]
        drop.add(id(n))
        done += 1
    if done:
        keep = [n for n in g.node if id(n) not in drop]
        del g.node[:]
        g.node.extend(keep)
        _drop_dead_nodes(model)
    return done


def drop_identity_output_reshapes(model: onnx.ModelProto, dims: dict[str, list]) -> int:
    """An identity Reshape (see `drop_identity_reshapes`) that writes a graph output: its
    source node writes the output itself (the step's `logits.reshape(-1, 1, V)`). Returns how many."""
    g = model.graph
    outputs = {o.name for o in g.output}
    inputs = {i.name for i in g.input} | {i.name for i in g.initializer}
    producers = {o: n for n in g.node for o in n.output}
    done = 0
    for n in list(g.node):
        if n.op_type != "Reshape" or n.domain not in ("", "ai.onnx") or n.output[0] not in outputs:
            continue
        src = n.input[0]
        if src in inputs or src in outputs or src not in producers:
            continue
        a, target = dims.get(src), _const_ints(model, n.input[1], producers)
        if not (a and target and len(target) == len(a) and target[0] in (-1, 0) and 0 not in target[1:]
                and all(isinstance(d, int) and d == t for d, t in zip(a[1:], target[1:]))):
            continue
        out = n.output[0]
        g.node.remove(n)
        p = producers[src]
        p.output[list(p.output).index(src)] = out
        for m in g.node:
            for k, v in enumerate(m.input):
                if v == src:
                    m.input[k] = out
        done += 1
    return done


def plain_softplus(model: onnx.ModelProto, min_threshold: float = 15.0) -> int:
    """Where(x > T, x, Softplus(x)) → Softplus(x): torch's `softplus(x, threshold=T)` as exported.

    onnxruntime's Softplus is overflow-safe (softplus(1000) = 1000), and for x > T ≥ 15 it
    differs from x by log1p(exp(-x)) < 3.1e-7, below float32 resolution at that size, so the
    Greater and Where are two nodes a token for nothing. Only thresholds ≥ min_threshold with
    beta 1 (Greater on x itself) are rewritten. Returns how many.
    """
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    inits = {i.name: i for i in g.initializer}
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    for n in g.node:
        if n.op_type != "Where" or n.domain not in ("", "ai.onnx") or n.output[0] in outputs:
            continue
        cond, x, other = (producers.get(v) for v in n.input)
        if (cond is None or other is None or cond.op_type != "Greater" or other.op_type != "Softplus"
                or cond.input[0] != n.input[1] or other.input[0] != n.input[1]):
            continue
        t = inits.get(cond.input[1])
        if t is None or numpy_helper.to_array(t).size != 1 or float(numpy_helper.to_array(t).item()) < min_threshold:
            continue
        rename[n.output[0]] = other.output[0]
    for n in g.node:
        for k, v in enumerate(n.input):
            n.input[k] = rename.get(v, v)
    _drop_dead_nodes(model)
    return len(rename)


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The If/Loop/Scan bodies a node carries."""
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def all_nodes(nodes) -> list[onnx.NodeProto]:
    """The nodes and, recursively, those of their subgraphs."""
    out = []
    for n in nodes:
        out.append(n)
        for sub in subgraphs(n):
            out += all_nodes(sub.node)
    return out


def names_read(nodes) -> set[str]:
    """Every name the nodes read, their subgraphs' reads of outer-scope values included."""
    nodes = all_nodes(nodes)
    return {v for n in nodes for v in n.input} | {o.name for n in nodes for sub in subgraphs(n) for o in sub.output}


def _drop_dead_nodes(model: onnx.ModelProto) -> None:
    g = model.graph
    while True:
        used = names_read(g.node) | {o.name for o in g.output}
        live = [n for n in g.node if any(o in used for o in n.output)]
        if len(live) == len(g.node):
            return
        del g.node[:]
        g.node.extend(live)


def prune(model: onnx.ModelProto) -> None:
    """Drop nodes, initializers, functions and opset imports that nothing uses any more."""
    g = model.graph
    _drop_dead_nodes(model)
    used = names_read(g.node) | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    called = {(n.domain, n.op_type) for n in all_nodes(g.node)}
    fns = [f for f in model.functions if (f.domain, f.name) in called]
    del model.functions[:]
    model.functions.extend(fns)
    domains = {n.domain for n in all_nodes(g.node)} | {o.domain for f in fns for o in f.opset_import}
    ops = [o for o in model.opset_import if o.domain in ("", "ai.onnx") or o.domain in domains]
    del model.opset_import[:]
    model.opset_import.extend(ops)


_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:$|\.)")


def name_nodes_by_layer(model: onnx.ModelProto) -> None:
    """Prefix every node name with the block it computes ("blocks.3/node_add_170"), then drop
    the exporter's per-node metadata (stack traces with the exporting machine's paths).

    torch's exporter records the module scopes a node was called in ("…/model.blocks.3.norm1:
    RMSNorm/div: aten.div"). Nodes of a block's own `step` code and nodes a rewrite added
    have no module scope, so they take the latest layer among the nodes that feed them (graph
    order is topological); nodes scoped outside the blocks (embedding, final norm, head) have
    none. Profilers report node names, so `itera-bench profile` can sum time per layer.
    """
    layer_of: dict[str, int | None] = {}  # value name -> layer of the node that produced it
    for n in model.graph.node:
        scope = next((p.value for p in n.metadata_props if p.key == "namespace"), "")
        modules = [seg.split(":")[0].strip() for seg in scope.split("/")[1:-1]]
        blocks = [int(m.group(1)) for seg in modules if (m := _BLOCK.search(seg))]
        if blocks:
            layer = blocks[-1]
        elif modules:
            layer = None  # inside a module that is not a block
        else:
            fed = [layer_of[i] for i in n.input if layer_of.get(i) is not None]
            layer = max(fed) if fed else None
        for o in n.output:
            layer_of[o] = layer
        del n.metadata_props[:]
    # Nodes that only prepare a layer's input (a transpose of a carried state) belong to it.
    consumers: dict[str, set] = {}
    for n in model.graph.node:
        layer = layer_of.get(n.output[0]) if n.output else None
        for i in n.input:
            consumers.setdefault(i, set()).add(layer)
    for n in reversed(model.graph.node):
        if n.output and layer_of.get(n.output[0]) is None:
            used_by = set().union(*(consumers.get(o, set()) for o in n.output))
            if len(used_by) == 1 and None not in used_by:
                layer_of[n.output[0]] = used_by.pop()
    for n in model.graph.node:
        layer = layer_of.get(n.output[0]) if n.output else None
        if layer is not None and not n.name.startswith("blocks."):
            n.name = f"blocks.{layer}/{n.name}"


def layer_prefix(node_name: str) -> str | None:
    """"blocks.3" for a node `name_nodes_by_layer` put in layer 3, else None."""
    head = node_name.split("/", 1)[0]
    return head if head.startswith("blocks.") and head[7:].isdigit() else None


def fuse_skip_rms_norms(model: onnx.ModelProto, dims: dict[str, list]) -> int:
    """Add(a, b) → RMSNorm (as `rms_normalize` exports: Pow, ReduceMean, Add eps, Sqrt, Div, Mul w)
    → one com.microsoft SkipSimplifiedLayerNormalization(a, b, w), whose 4th output is the sum.

    A residual add and the next norm are one node where onnxruntime (1.32, CPU) keeps two: it
    fuses the norm but not the add into it. Only 3-D a and b of the same known shape, a
    1-D weight initializer and the last axis. dims: shapes from shape inference. Returns how many.
    """
    g = model.graph
    producers, consumers = _wiring(g)
    inits = {i.name: i for i in g.initializer}

    def const(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        c = producers.get(name)
        if c is not None and c.op_type == "Constant" and c.attribute and c.attribute[0].name == "value":
            return numpy_helper.to_array(c.attribute[0].t)
        return None

    def only(value, op):
        users = consumers.get(value, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    done, remove, add_nodes = 0, set(), []
    for div in list(g.node):
        if div.op_type != "Div" or div.domain not in ("", "ai.onnx"):
            continue
        x = div.input[0]
        sqrt = producers.get(div.input[1])
        eps_add = producers.get(sqrt.input[0]) if sqrt is not None and sqrt.op_type == "Sqrt" else None
        mean = producers.get(eps_add.input[0]) if eps_add is not None and eps_add.op_type == "Add" else None
        pow_ = producers.get(mean.input[0]) if mean is not None and mean.op_type == "ReduceMean" else None
        res = producers.get(x)
        mul = only(div.output[0], "Mul")
        if (pow_ is None or pow_.op_type != "Pow" or pow_.input[0] != x or mul is None
                or res is None or res.op_type != "Add" or res.domain not in ("", "ai.onnx")):
            continue
        two, eps, axes = const(pow_.input[1]), const(eps_add.input[1]), const(mean.input[1]) if len(mean.input) > 1 else None
        keep = next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
        w = mul.input[1] if mul.input[0] == div.output[0] else mul.input[0]
        a, b = res.input
        shape_a, shape_b = dims.get(a), dims.get(b)
        if (two is None or two.size != 1 or float(two) != 2.0 or eps is None or eps.size != 1 or axes is None
                or axes.tolist() not in ([-1], [2]) or not keep or w not in inits or len(inits[w].dims) != 1
                or not shape_a or len(shape_a) != 3 or shape_a != shape_b or None in shape_a
                or shape_a[-1] != inits[w].dims[0] or only(pow_.output[0], "ReduceMean") is None
                or only(mean.output[0], "Add") is None or only(eps_add.output[0], "Sqrt") is None
                or only(sqrt.output[0], "Div") is None):
            continue
        fused = helper.make_node("SkipSimplifiedLayerNormalization", [a, b, w], [mul.output[0], "", "", x],
                                 name=(res.name or x) + "_skip_norm", domain="com.microsoft", epsilon=float(eps))
        remove.update(id(n) for n in (res, pow_, mean, eps_add, sqrt, div, mul))
        add_nodes.append((res, fused))
        done += 1
    if not done:
        return 0
    where = {id(res): fused for res, fused in add_nodes}
    nodes = [where.get(id(n), n) for n in g.node if id(n) not in remove or id(n) in where]
    del g.node[:]
    g.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def sink_reshapes(model: onnx.ModelProto, dims: dict[str, list]) -> int:
    """Move Reshapes below element-wise ops so that chains of them meet and cancel.

    - Mul(Reshape(a), c) with c a constant that broadcasts over the dims the Reshape split out
      of a's last axis → Reshape(Mul(a, c spread to that axis)): a per-head scale (the SSM's D
      skip on (B, T, H, P)) applied in the packed (B, T, H·P) layout.
    - Add(Reshape(p, s), Reshape(q, s)) with p and q of one known shape → Reshape(Add(p, q), s).
    Then `collapse_reshapes` / `drop_identity_reshapes` fold the Reshape into the next one.
    Exact: the same products and sums, in another layout. Returns how many ops moved.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    done = 0
    changed = True
    while changed:
        changed = False
        producers = {o: n for n in g.node for o in n.output}
        for k, n in enumerate(list(g.node)):
            if n.op_type not in ("Mul", "Add") or n.domain not in ("", "ai.onnx"):
                continue
            r = [producers.get(i) for i in n.input]
            new = None
            if n.op_type == "Mul":
                for j in (0, 1):
                    rs, c = r[j], n.input[1 - j]
                    if rs is None or rs.op_type != "Reshape" or c not in inits:
                        continue
                    src, out = dims.get(rs.input[0]), dims.get(rs.output[0])
                    if not src or not out or len(out) < len(src):
                        continue
                    lead = len(src) - 1
                    tail = out[lead:]
                    cv = numpy_helper.to_array(inits[c])
                    if (src[:lead] != out[:lead] or None in src[:lead] or not all(isinstance(d, int) for d in tail)
                            or src[-1] != int(np.prod(tail)) or cv.ndim > len(tail)):
                        continue
                    try:
                        spread = np.ascontiguousarray(np.broadcast_to(cv, tail)).reshape(-1)
                    except ValueError:
                        continue
                    name = f"{c}_spread_{src[-1]}"
                    if name not in inits:
                        g.initializer.append(numpy_helper.from_array(spread.astype(cv.dtype), name))
                        inits[name] = g.initializer[-1]
                    flat = n.output[0] + "_packed"
                    new = [helper.make_node("Mul", [rs.input[0], name], [flat], name=(n.name or n.output[0]) + "_packed"),
                           helper.make_node("Reshape", [flat, rs.input[1]], list(n.output), name=(n.name or n.output[0]) + "_unpack")]
                    dims[flat] = list(src)
                    break
            else:
                # Same input shape and same output shape: either Reshape's target serves both.
                if (all(x is not None and x.op_type == "Reshape" for x in r)
                        and dims.get(r[0].input[0]) and dims.get(r[0].input[0]) == dims.get(r[1].input[0])
                        and dims.get(r[0].output[0]) and dims.get(r[0].output[0]) == dims.get(r[1].output[0])
                        and None not in dims[r[0].input[0]] + dims[r[0].output[0]]):
                    flat = n.output[0] + "_packed"
                    new = [helper.make_node("Add", [r[0].input[0], r[1].input[0]], [flat], name=(n.name or n.output[0]) + "_packed"),
                           helper.make_node("Reshape", [flat, r[0].input[1]], list(n.output), name=(n.name or n.output[0]) + "_unpack")]
                    dims[flat] = list(dims[r[0].input[0]])
            if new:
                pos = list(g.node).index(n)
                g.node.remove(n)
                for i, m in enumerate(new):
                    g.node.insert(pos + i, m)
                done += 1
                changed = True
                break
    _drop_dead_nodes(model)
    return done


def share_constants(model: onnx.ModelProto) -> int:
    """One Constant node per distinct value: an inlined function repeats its constants at every
    call (the prompt scan's 64 × 64 masks, 16 KB each, once per layer). The kept ones move to the
    front (a Constant has no inputs); returns how many copies went."""
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        return 0  # names inside subgraphs are not rewired here
    outputs = {o.name for o in g.output}
    first: dict[bytes, str] = {}
    rename: dict[str, str] = {}
    kept, rest = [], []
    for n in g.node:
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and [a.name for a in n.attribute] == ["value"] \
                and n.output[0] not in outputs:
            t = onnx.TensorProto()
            t.CopyFrom(n.attribute[0].t)
            t.name = ""
            key = t.SerializeToString()
            if key in first:
                rename[n.output[0]] = first[key]
                continue
            first[key] = n.output[0]
            kept.append(n)
        else:
            rest.append(n)
    for n in rest:
        n.input[:] = [rename.get(v, v) for v in n.input]
    del g.node[:]
    g.node.extend(kept + rest)
    return len(rename)


LOGITS_START = "logits_start"


def slice_head_input(model: onnx.ModelProto, logits: str = "logits", name: str = LOGITS_START) -> str:
    """Add an int64 input `name` (shape [1]) that picks the positions the head runs on.

    The head's input (batch, seq, D) is sliced along seq from `name`, as a Python slice start:
    -1 keeps the last position (what generation reads: the head of a 512-token prompt is ~10%
    of tiny's prompt and most of a large-vocabulary model's), 0 keeps every position (what
    scoring reads). One Slice, before the head's MatMul, so every consumer of that tensor —
    the head and a `hidden` output alike — sees the same positions. Returns the input's name.
    """
    g = model.graph
    producers, _ = _wiring(g)
    head = producers.get(logits)
    if head is None or not head.input:
        raise ValueError(f"no node writes {logits!r}")
    h = head.input[0]
    src = producers.get(h)
    if src is None:
        raise ValueError(f"the head's input {h!r} is not computed by the graph")
    if name in {v.name for v in g.input} | {i.name for i in g.initializer} | {o for n in g.node for o in n.output}:
        raise ValueError(f"the graph already has a value named {name!r}")
    every = f"{h}.every_position"
    src.output[list(src.output).index(h)] = every
    for vi in g.value_info:
        if vi.name == h:
            vi.name = every
    at = list(g.node).index(src) + 1
    for i, (part, value) in enumerate((("end", 2**62), ("axis", 1))):  # Constant nodes: never external data
        g.node.insert(at + i, helper.make_node("Constant", [], [f"{name}.{part}"], name=f"{name}.{part}",
                                               value=numpy_helper.from_array(np.array([value], np.int64))))
    g.node.insert(at + 2, helper.make_node("Slice", [every, name, f"{name}.end", f"{name}.axis"], [h],
                                           name=f"{name}.slice"))
    g.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.INT64, [1]))
    for o in g.output:  # their positions are the kept ones now, not the prompt's
        dims = o.type.tensor_type.shape.dim
        if o.name in (logits, h) and len(dims) == 3:
            dims[1].Clear()
            dims[1].dim_param = "kept"
    return name
