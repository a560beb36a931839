"""Where a training step's FLOPs go: XLA's cost rules applied op by op to the optimized HLO.

    python benchmarks/flops.py --atoms 14 --batch-size 8                       # E-F, HVP random K=1, K=4
    python benchmarks/flops.py --schemes E-F "E-F-HVP random K=1" --dump-dir /tmp/hlo   # + keep the HLO
    python benchmarks/flops.py --hlo /tmp/hlo/E-F.hlo /tmp/hlo/E-F-HVP_random_K=1.hlo     # saved dumps only

Each step is compiled as benchmarks/training_cost.py compiles it (`compile_step`: loss, parameter
gradient, clip + AdamW + plateau update) and its optimized HLO (`compiled.as_text()`) is re-counted
op by op with the rules of XLA's HloCostAnalysis: a dot is 2 x output elements x contraction size;
an elementwise op (compare, select and convert included) one per output element; a reduce (input -
output elements) x its reducer's ops; a scatter its updates x its combiner's ops; transcendentals,
copies, slices, gathers, broadcasts 0; a fusion the sum of its ops; a conditional its costlier
branch; a while loop its body times its known trip count (XLA's own `cost_analysis()` counts a
loop body once, so a chunked E-F-H step, whose Hessian columns are a `lax.map` loop, reads low
there by about the number of chunks; `loop_extra_flops` is the difference, which
training_cost.py adds). The recount is checked against `cost_analysis()["flops"]` and then split

- by op kind: dot, elementwise, reduce, scatter/gather;
- by part of the derivative schedule, from the JAX name stack XLA keeps in each op's metadata: the
  value pass (forward; force backward = `transpose(jvp(...))` inside; HVP tangent forward and tangent
  backward = under the probe `vmap` of `linearize`) and the parameter gradient of each
  (`transpose(...)` outermost); ops outside the model by the phljax function that made them (loss
  terms, `reference_hvp`, probes, optimizer). A single probe goes through a plain `jax.jvp`, whose
  tangent ops carry the primal's names: there the tangent is counted with the primal;
- by model component (radial MLP, tensor product, weights x messages, Linear, ...).

"read" beside XLA's count: XLA fuses a cheap elementwise producer into every consumer fusion and
counts it at full size in each, also where the consumer reads only a slice of it (the CPU code
computes just that slice). Weighting each fused op by the fraction of its elements that the
fusion's outputs read estimates the arithmetic actually done; XLA's count is the one the targets
and training_cost.py use.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import re
import sys

# ---------------------------------------------------------------- HLO text and XLA's cost rules

ELEMENTWISE = frozenset(
    "abs add and ceil clamp compare convert count-leading-zeros divide floor imag is-finite maximum minimum "
    "multiply negate not or popcnt real reduce-precision remainder round-nearest-afz round-nearest-even "
    "select shift-left shift-right-arithmetic shift-right-logical sign stochastic-convert subtract xor".split()
)
TRANSCENDENTAL = frozenset(
    "acosh atan2 cbrt cosine erf exponential exponential-minus-one log log-plus-one logistic power rsqrt "
    "sine sqrt tan tanh".split()
)
_ONE_TO_ONE = ELEMENTWISE | TRANSCENDENTAL | {"bitcast", "reshape", "copy", "transpose"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_ARRAY = re.compile(r"[a-z]\w*\[([\d,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")


def _dims(shape: str) -> list[int]:
    m = _ARRAY.search(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _elements(shape: str) -> int:
    return math.prod(_dims(shape)) if _ARRAY.search(shape) else 0


def _close(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text[:80]!r}")


def _split_instruction(rest: str) -> tuple[str, str, list[str], str]:
    """`shape opcode(operands), attributes` -> (shape, opcode, operand names, attributes)."""
    end = _close(rest, 0) + 1 if rest.startswith("(") else rest.index(" ")  # a tuple shape, or an array's
    shape, rest = rest[:end], rest[end:].lstrip()
    opcode = rest[: rest.index("(")]
    close = _close(rest, rest.index("("))
    return shape, opcode, _NAME.findall(rest[:close]), rest[close + 1 :]


def parse_hlo(text: str):
    """(computations {name: [instruction dicts]}, entry name, frames(id) -> [(file, function, line)])."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if not line.startswith((" ", "}")) and line.rstrip().endswith("{") and "%" in line:
            name = _NAME.search(line).group(1)
            entry = name if line.startswith("ENTRY") else entry
            current = computations[name] = []
        elif line.startswith("}"):
            current = None
        elif current is not None and (m := _INSTRUCTION.match(line)):
            shape, opcode, operands, attrs = _split_instruction(line[m.end() :])
            current.append({"name": m.group(1), "shape": shape, "op": opcode, "operands": operands, "attrs": attrs})
    return computations, entry, _stack_frames(text)


def _stack_frames(text: str):
    """The module's source table: frame id -> [(file, function, line)], innermost first."""
    section, files, functions, locations, frames = None, {}, {}, {}, {}
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("%", "ENTRY")):
            break
        if s in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = s
            continue
        key, _, value = s.partition(" ")
        if not key.isdigit():
            continue
        fields = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", value)}
        if section == "FileNames":
            files[int(key)] = value.strip('"')
        elif section == "FunctionNames":
            functions[int(key)] = value.strip('"')
        elif section == "FileLocations":
            locations[int(key)] = (files[fields["file_name_id"]], functions[fields["function_name_id"]], fields["line"])
        elif section == "StackFrames":
            frames[int(key)] = (fields["file_location_id"], fields["parent_frame_id"])

    def chain(frame_id: int) -> list[tuple[str, str, int]]:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            location, frame_id = frames[frame_id]
            out.append(locations[location])
        return out

    return chain


def _read_fractions(instructions: list[dict]) -> dict[str, float]:
    """Per fused instruction, the fraction of its elements that the fusion's outputs read."""
    users = collections.defaultdict(list)
    for ins in instructions:
        for operand in ins["operands"]:
            users[operand].append(ins)
    fraction = {}
    for ins in reversed(instructions):  # users come after their operands
        n = _elements(ins["shape"]) or 1
        if not users.get(ins["name"]):
            fraction[ins["name"]] = 1.0
            continue
        read = 0.0
        for user in users[ins["name"]]:
            f = fraction.get(user["name"], 1.0)
            if user["op"] in _ONE_TO_ONE or user["op"] == "broadcast":
                read += f
            elif user["op"] in ("slice", "dynamic-slice") and user["operands"][0] == ins["name"]:
                read += f * (_elements(user["shape"]) or 1) / n
            elif user["op"] in ("pad", "concatenate"):
                read += f * min(1.0, (_elements(user["shape"]) or 1) / n)
            else:
                read += 1.0
        fraction[ins["name"]] = min(1.0, read)
    return fraction


def _trip_count(ins: dict) -> int:
    """The known trip count XLA records on a while op (backend_config known_trip_count)."""
    m = re.search(r'known_trip_count"?:\{"n":"(\d+)"\}', ins["attrs"])
    if not m:
        raise ValueError(f"{ins['name']}: a while loop without a known trip count; its FLOPs cannot be counted")
    return int(m.group(1))


def op_costs(text: str, count_trips: bool = True) -> tuple[list[tuple], object]:
    """Every leaf op of the entry computation (fusions, calls, loops and branches opened):
    (flops, opcode, op_name, stack frame id, shape, read flops); and the frame resolver. A loop
    body's ops count times the loop's trip count (`count_trips=False`: once, as XLA's
    `cost_analysis()` does)."""
    computations, entry, frames = parse_hlo(text)
    memo = {}

    def leaves(comp: str, inherited=None, fused=False) -> list[tuple]:
        if (comp, inherited, fused) in memo:
            return memo[(comp, inherited, fused)]
        out, table, seen = [], {ins["name"]: ins for ins in computations[comp]}, {}
        fraction = _read_fractions(computations[comp]) if fused else {}
        total = lambda c: sum(x[0] for x in leaves(c))
        for ins in computations[comp]:
            op, attrs = ins["op"], ins["attrs"]
            called = lambda key, a=attrs: re.search(key + r"=%([\w.\-]+)", a).group(1)
            name = re.search(r'op_name="([^"]*)"', attrs)
            frame = re.search(r"stack_frame_id=(\d+)", attrs)
            meta = (name.group(1), int(frame.group(1)) if frame else 0) if name else inherited
            if meta is None:  # ops XLA created without metadata (dot rewrites): their first named operand's
                meta = next((seen[o] for o in ins["operands"] if seen.get(o, ("",))[0]), ("", 0))
            seen[ins["name"]] = meta
            if op == "fusion":
                out += leaves(called("calls"), meta, True)
            elif op == "call":
                out += leaves(called("to_apply"), meta)
            elif op == "while":
                n = _trip_count(ins) if count_trips else 1
                body = leaves(called("body"), meta) + leaves(called("condition"), meta)
                out += [(f * n, o, nm, fr, sh, r * n) for f, o, nm, fr, sh, r in body]
            elif op == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", attrs)
                branches = _NAME.findall(m.group(1)) if m else [called("true_computation"), called("false_computation")]
                out += max((leaves(b, meta) for b in branches), key=lambda ops: sum(x[0] for x in ops))
            else:
                flops = 0
                if op in ELEMENTWISE:
                    flops = _elements(ins["shape"])
                elif op == "dot":
                    lhs = _dims(table[ins["operands"][0]]["shape"])
                    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs).group(1)
                    flops = 2 * _elements(ins["shape"]) * math.prod(lhs[int(d)] for d in contracting.split(",") if d)
                elif op == "reduce":
                    reduced = _elements(table[ins["operands"][0]]["shape"]) - _elements(ins["shape"])
                    flops = reduced * total(called("to_apply"))
                elif op == "scatter":
                    updates = table[ins["operands"][-((len(ins["operands"]) - 1) // 2)]]["shape"]
                    flops = _elements(updates) * total(called("to_apply"))
                elif op == "reduce-window":
                    window = math.prod(int(d) for d in re.search(r"size=([\dx]+)", attrs).group(1).split("x"))
                    flops = (window - 1) * _elements(ins["shape"]) * total(called("to_apply"))
                elif op == "sort":
                    n = _elements(table[ins["operands"][0]]["shape"])
                    flops = n * math.ceil(math.log2(max(n, 2)))
                elif op == "convolution":
                    # phljax's steps have none; refuse rather than count a convolution as 0 FLOPs
                    raise ValueError(f"{ins['name']}: flops.py does not count convolutions; use cost_analysis()")
                out.append((flops, op, meta[0], meta[1], ins["shape"], flops * fraction.get(ins["name"], 1.0)))
        memo[(comp, inherited, fused)] = out
        return out

    return leaves(entry), frames


def loop_extra_flops(text: str) -> float:
    """FLOPs that XLA's `cost_analysis()` leaves out of a program: every while body beyond its first
    trip (the recount with trip counts minus the recount without)."""
    with_trips = sum(x[0] for x in op_costs(text, True)[0])
    return float(with_trips - sum(x[0] for x in op_costs(text, False)[0]))


# ---------------------------------------------------------------- attribution


def op_kind(opcode: str) -> str:
    if opcode in ("dot", "convolution"):
        return "dot"
    if opcode in ("reduce", "reduce-window"):
        return "reduce"
    if opcode in ("scatter", "gather"):
        return "scatter/gather"
    return "elementwise" if opcode in ELEMENTWISE else "other"


def _transforms(op_name: str) -> list[str]:
    """The transforms wrapping the model in an op's name stack, outermost first: `jit(step)/transpose(
    jvp(vmap(jvp(NequIP))))/...` -> ["transpose", "jvp", "vmap", "jvp"]; [] outside the model."""
    head = op_name.split("NequIP", 1)[0] if "NequIP" in op_name else ""
    return re.findall(r"(\w+)\(", head.rsplit("/", 1)[-1])


_LOSS_FUNCTIONS = {
    "reference_hvp": "reference HVP (H_ref v from the stored blocks)",
    "batch_probes": "probes",
    "molecule_probes": "probes",
    "energy_loss": "loss terms",
    "force_loss": "loss terms",
    "hvp_loss": "loss terms",
    "hessian_loss": "loss terms",
    "_per_graph": "loss terms",
    "loss_fn": "loss terms",
    "make_loss_fn.<locals>.loss_fn": "loss terms",
}


def schedule_part(op_name: str, functions: list[str]) -> str:
    """Which part of the derivative schedule an op belongs to (see the module docstring)."""
    chain = _transforms(op_name)
    if not chain:
        for fn in functions:
            if fn in _LOSS_FUNCTIONS:
                return _LOSS_FUNCTIONS[fn]
        if any(fn.startswith("make_train_step") for fn in functions) or "cond/" in op_name:
            return "optimizer (clip, AdamW, plateau)"
        return "unattributed (no metadata)" if not op_name else "other (outside the model)"
    gradient = chain[0] == "transpose"
    inner = chain[2:] if gradient else chain[1:]  # drop the parameter gradient's own jvp (linearisation)
    if not inner:  # an energy-only loss: no position derivative
        part = "forward"
    else:
        tangent = "vmap" in inner or ("while" in op_name and "map" in op_name)
        backward = "transpose" in inner
        part = ("tangent " if tangent else "") + ("backward (forces)" if backward else "forward")
        part = part.replace("tangent backward (forces)", "tangent backward")
    return ("param. gradient of " if gradient else "") + part


def model_component(op_name: str, functions: list[str]) -> str:
    if "MultiLayerPerceptron" in op_name or "_radial_weights" in " ".join(functions):
        return "radial MLP"
    if "...ui , ...vj , ijk -> ...uvk" in op_name:
        return "tensor product h[senders] x sh"
    if "...ui , ...uj , ijk -> ...uk" in op_name or "_scale_chunks" in " ".join(functions):
        return "radial weights x messages"
    if "Linear_" in op_name:
        return "Linear layers (nodes)"
    if "polyval" in op_name:
        return "cutoff envelope"
    if "scatter-add" in op_name or "/gather" in op_name:
        return "edge gather / scatter-sum"
    if "NequIP" not in op_name:
        return "outside the model"
    return "other model ops (geometry, sh, gates, readout)"


def attribute(ops: list[tuple], frames) -> dict:
    """Sums of XLA's FLOPs and of read FLOPs by (part, kind) and (component, part)."""
    by_part, by_component = collections.Counter(), collections.Counter()
    read_part = collections.Counter()
    for flops, opcode, op_name, frame, _, read in ops:
        functions = [f[1] for f in frames(frame)]
        part = schedule_part(op_name, functions)
        by_part[(part, op_kind(opcode))] += flops
        read_part[part] += read
        by_component[(model_component(op_name, functions), part)] += flops
    return {"part": by_part, "component": by_component, "read_part": read_part}


_KINDS = ("dot", "elementwise", "reduce", "scatter/gather", "other")


def part_table(attribution: dict, total: float) -> str:
    parts = collections.Counter()
    for (part, _), v in attribution["part"].items():
        parts[part] += v
    lines = [
        "| part of the step | MFLOP | share | " + " | ".join(_KINDS) + " | read MFLOP |",
        "|---|---|---|" + "---|" * (len(_KINDS) + 1),
    ]
    for part, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        if not v:
            continue
        kinds = " | ".join(f"{attribution['part'][(part, k)] / 1e6:.1f}" for k in _KINDS)
        read = attribution["read_part"][part] / 1e6
        digits = 1 if v >= 1e5 else 3  # keep the small rows (reference HVP, probes) visible
        lines.append(f"| {part} | {v / 1e6:.{digits}f} | {100 * v / total:.1f}% | {kinds} | {read:.{digits}f} |")
    return "\n".join(lines)


def component_table(attribution: dict, total: float) -> str:
    components, parts = collections.Counter(), collections.Counter()
    for (component, part), v in attribution["component"].items():
        components[component] += v
        parts[part] += v
    cols = [p for p, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v >= 0.01 * total]
    lines = ["| component | MFLOP | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for component, v in sorted(components.items(), key=lambda kv: -kv[1]):
        if v < 1e-4 * total:
            continue
        cells = " | ".join(f"{attribution['component'][(component, p)] / 1e6:.1f}" for p in cols)
        lines.append(f"| {component} | {v / 1e6:.1f} | {cells} |")
    return "\n".join(lines)


def top_ops(ops: list[tuple], frames, n: int) -> str:
    """The op groups (same name, opcode, shape) with the most FLOPs, with their count and read FLOPs."""
    flops, read, count = collections.Counter(), collections.Counter(), collections.Counter()
    for f, opcode, op_name, _, shape, r in ops:
        key = (op_name.removeprefix("jit(step)/")[-110:], opcode, shape.split("{")[0])
        flops[key] += f
        read[key] += r
        count[key] += 1
    lines = ["| MFLOP | read MFLOP | ops | op name | opcode | shape |", "|---|---|---|---|---|---|"]
    for key, v in flops.most_common(n):
        lines.append(f"| {v / 1e6:.2f} | {read[key] / 1e6:.2f} | {count[key]} | `{key[0]}` | {key[1]} | {key[2]} |")
    return "\n".join(lines)


def report(label: str, text: str, xla_flops: float | None = None, top: int = 0) -> str:
    ops, frames = op_costs(text)
    total = sum(x[0] for x in ops)
    read = sum(x[5] for x in ops)
    dots = sum(x[0] for x in ops if op_kind(x[1]) == "dot")
    check = f", XLA cost_analysis {xla_flops / 1e6:.1f}" if xla_flops is not None else ""
    out = [
        f"### {label}: {total / 1e6:.1f} MFLOP (recount{check}); dots {dots / 1e6:.1f}; read {read / 1e6:.1f}",
        "",
        part_table(attribute(ops, frames), total),
        "",
        component_table(attribute(ops, frames), total),
    ]
    if top:
        out += ["", top_ops(ops, frames, top)]
    return "\n".join(out)


# ---------------------------------------------------------------- command line


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:0] = [os.path.dirname(here), here]  # this checkout's phljax, whatever else is installed
    import training_cost

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--atoms", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--schemes", nargs="+", default=["E-F", "E-F-HVP random K=1", "E-F-HVP random K=4"])
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--lmax", type=int, default=2)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hessian-chunk", type=int, default=0, help="E-F-H columns per chunk (0: all)")
    p.add_argument("--top", type=int, default=15, help="list the N costliest op groups (0: none)")
    p.add_argument("--dump-dir", help="write each step's optimized HLO text here")
    p.add_argument("--hlo", nargs="+", metavar="FILE", help="analyse saved HLO dumps instead of compiling")
    args = p.parse_args(argv)

    if args.hlo:
        for path in args.hlo:
            with open(path) as f:
                print(report(os.path.basename(path), f.read(), top=args.top), "\n", flush=True)
        return
    schemes = {label: (probe, k) for label, probe, k in training_cost.SCHEMES}
    model_kwargs = {"channels": args.channels, "lmax": args.lmax, "num_layers": args.num_layers}
    for label in args.schemes:
        probe, k = schemes[label]
        compiled, *_ = training_cost.compile_step(
            probe, k, args.atoms, args.batch_size, model_kwargs, args.hessian_chunk or None
        )
        text = compiled.as_text()
        if args.dump_dir:
            os.makedirs(args.dump_dir, exist_ok=True)
            with open(os.path.join(args.dump_dir, label.replace(" ", "_") + ".hlo"), "w") as f:
                f.write(text)
        cost = training_cost.xla_cost(compiled)
        print(report(f"{label}, {args.atoms} atoms, batch {args.batch_size}", text, cost["flops"], args.top))
        print(f"\nXLA bytes accessed: {cost['bytes_accessed'] / 1e6:.1f} MB\n", flush=True)


if __name__ == "__main__":
    main()
