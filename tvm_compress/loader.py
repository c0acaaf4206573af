"""ONNX -> Relax import that survives real exported models.

Steps: read and check the file; fix every input's shape (from the model, or ``input_shapes``);
bind the inputs given values (``input_values``) and inline the ``If`` nodes those decide
(``onnx_control``); fold shape-computing subgraphs (Shape -> Gather -> Concat -> Reshape,
dynamic Pad ...) with onnxruntime's basic graph optimizations; unroll LSTM/GRU/RNN nodes over their now fixed sequence
length (``onnx_rnn``); list unsupported ops all at once; then
``tvm.relax.frontend.onnx.from_onnx`` with weights embedded as constants.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import io
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import ModelError, ShapeError, UnsupportedOpError
from .onnx_control import bind_inputs, deciding_inputs, inline_constant_ifs
from .onnx_einsum import einsums_as_matmuls
from .onnx_norms import group_norms_unfolded
from .onnx_rnn import all_nodes, expand_recurrent
from .specs import InputSpec, OutputSpec

ShapeMap = Mapping[str, Sequence[int]]


@dataclass
class PreparedModel:
    """An ONNX model with fixed input shapes and folded shape subgraphs, ready for import."""

    path: Path
    sha256: str
    model: onnx.ModelProto  # prepared (shapes fixed, folded)
    original: onnx.ModelProto
    inputs: List[InputSpec]
    outputs: List[OutputSpec]
    folded: bool = True
    notes: List[str] = field(default_factory=list)
    # The model upgraded to a newer opset when onnxruntime cannot run the file's own opset.
    upgraded: Optional[bytes] = None
    # Inputs fixed to values (``input_values``): constants of ``model``, fed to the reference.
    bound: Dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def reference(self) -> Union[str, bytes]:
        """What onnxruntime (the numerical reference) loads: the file, or its upgraded bytes."""
        return self.upgraded if self.upgraded is not None else str(self.path)

    def shape_dict(self) -> Dict[str, tuple]:
        return {i.name: i.shape for i in self.inputs}

    def bound_values(self) -> Dict[str, object]:
        """The fixed inputs' values as plain lists (manifests, fingerprints)."""
        return {k: v.tolist() for k, v in self.bound.items()}

    def to_relax(self):
        """The Relax IRModule, weights bound as constants, canonicalized (``import_passes``)."""
        import tvm
        from tvm.relax.frontend.onnx import from_onnx

        try:
            # The importer prints "Error converting operator ..." to stdout before raising: the
            # one-line error below says it.
            with contextlib.redirect_stdout(io.StringIO()):
                mod = from_onnx(
                    self.model,
                    shape_dict={k: list(v) for k, v in self.shape_dict().items()},
                    dtype_dict={i.name: i.dtype for i in self.inputs},
                    keep_params_in_input=False,
                )
        except Exception as err:  # the importer raises many kinds; keep one line
            msg = str(err).strip().splitlines()
            raise ModelError(
                f"{self.path}: Relax ONNX import failed: {msg[-1] if msg else type(err).__name__}"
            ) from None
        return tvm.transform.Sequential(import_passes(self.model))(mod)


def import_passes(model: Optional[onnx.ModelProto] = None) -> list:
    """Layer names from ``model``'s nodes, then rewrites applied to every imported model before
    any compression pass: exact ones, and HardSwish in the ONNX definition's form (what
    onnxruntime computes, to an ulp of the importer's)."""
    from tvm import relax

    from tvm_compress.passes import (Conv1dToConv2d, ConvTransposeToConv, DropPaddingTaps,
                                     HardSwishAsHardSigmoid, StackReduceToBinary, TeCallsToOps)

    from .layers import NameLayers, onnx_layer_names

    return [
        NameLayers(onnx_layer_names(model) if model is not None else None),
        # Models with control flow import without dataflow blocks (the importer cannot open
        # one around an If); the passes rewrite dataflow blocks, so form them around the Ifs.
        relax.transform.ConvertToDataflow(),
        TeCallsToOps(),
        StackReduceToBinary(),
        HardSwishAsHardSigmoid(),
        ConvTransposeToConv(),
        Conv1dToConv2d(),
        DropPaddingTaps(),
    ]


def parse_shape_arg(text: str) -> Tuple[str, tuple]:
    """``"x=1,3,224,224"`` -> ``("x", (1, 3, 224, 224))``."""
    name, sep, dims = text.partition("=")
    if not sep or not name.strip():
        raise ShapeError(f"bad --input-shape {text!r}: expected NAME=D0,D1,... e.g. input=1,3,224,224")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise ShapeError(f"bad --input-shape {text!r}: dimensions must be integers") from None
    if not shape or any(d <= 0 for d in shape):
        raise ShapeError(f"bad --input-shape {text!r}: dimensions must be positive integers")
    return name.strip(), shape


def parse_value_arg(text: str) -> Tuple[str, list]:
    """``"sr=16000"`` -> ``("sr", [16000])``; ``"mask=1,0,1"`` -> ``("mask", [1, 0, 1])``."""
    name, sep, vals = text.partition("=")
    try:
        values = [float(v) if any(c in v for c in ".eEn") else int(v) for v in vals.split(",") if v.strip()]
    except ValueError:
        values = []
    if not sep or not name.strip() or not values:
        raise ShapeError(f"bad --input-value {text!r}: expected NAME=V or NAME=V0,V1,... e.g. sr=16000")
    return name.strip(), values


def _bound_values(model: onnx.ModelProto, given: Mapping[str, Sequence], shapes: Dict[str, tuple]
                  ) -> Dict[str, np.ndarray]:
    """The arrays ``input_values`` fix, shaped and typed as their inputs. An input whose shape is
    dynamic and not given takes the values' own: a scalar for one value, else a vector."""
    inputs = {i.name: i for i in _graph_inputs(model)}
    out = {}
    for name, values in given.items():
        if name not in inputs:
            raise ShapeError(f"--input-value names {name!r}, but the model's inputs are: {', '.join(inputs)}")
        ttype = inputs[name].type.tensor_type
        dims = list(ttype.shape.dim)
        if name not in shapes:
            if ttype.HasField("shape") and all(d.dim_value > 0 for d in dims):
                shapes[name] = tuple(d.dim_value for d in dims)
            elif not dims or len(dims) == 1:
                shapes[name] = () if not dims and len(values) == 1 else (len(values),)
            else:
                raise ShapeError(f"--input-value {name}: the input's shape is dynamic; pass --input-shape {name}=...")
        shape = shapes[name]
        size = int(np.prod(shape, dtype=np.int64))
        if len(values) not in (1, size):
            raise ShapeError(f"--input-value {name}: {len(values)} values for shape {list(shape)} "
                             f"({size} values, or one for all)")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type))
        arr = np.asarray(values)
        if dtype.kind in "iub" and arr.dtype.kind == "f":
            raise ShapeError(f"--input-value {name}: the input is {dtype}, got {_vals_text(values)}")
        out[name] = (np.full(shape, arr[0]) if arr.size == 1 else arr.reshape(shape)).astype(dtype)
    return out


def _vals_text(values: Sequence) -> str:
    return ",".join(str(v) for v in values)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_onnx(path: str | os.PathLike) -> onnx.ModelProto:
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a directory, not an ONNX file: {path}")
    size, total = path.stat().st_size, _memory_bytes()
    if size > total // 3:  # loading takes a copy or two of it: refuse before reading a byte
        raise ModelError(f"{path} is {size / 2**30:.1f} GiB; too large to load with this machine's "
                         f"{total / 2**30:.0f} GiB memory")
    try:
        # External weights are read only from inside the model's folder (onnx refuses "../").
        model = onnx.load(str(path))
    except Exception as err:  # DecodeError, RuntimeError, ValidationError ...
        raise ModelError(f"{path} is not a valid ONNX model ({type(err).__name__}: {_one_line(err, 200)})") from None
    if not model.graph.node:
        raise ModelError(f"{path} is not a valid ONNX model (no graph nodes; truncated or not ONNX?)")
    newest = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > newest:
            raise ModelError(f"{path} uses ONNX opset {op.version}; the newest this onnx ({onnx.__version__}) "
                             f"knows is {newest}")
    try:
        onnx.checker.check_model(model)
    except Exception as err:
        raise ModelError(f"{path} fails the ONNX checker: {_one_line(err)}") from None
    return model


def _one_line(err: Exception, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dtype_name(elem_type: int) -> str:
    return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))


def _graph_inputs(model: onnx.ModelProto):
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _fix_input_shapes(model: onnx.ModelProto, given: Dict[str, tuple], path: Path) -> List[InputSpec]:
    inputs = _graph_inputs(model)
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            raise ShapeError(f"--input-shape names {name!r}, but the model's inputs are: {', '.join(names)}")
    specs = []
    for inp in inputs:
        ttype = inp.type.tensor_type
        dims = list(ttype.shape.dim)
        # Exporters mark dynamic dims with a name, with nothing, or with -1 (PaddlePaddle's).
        shown = [d.dim_param or (str(d.dim_value) if d.dim_value > 0 else "?") for d in dims]
        if inp.name in given:
            shape = given[inp.name]
            if ttype.HasField("shape") and len(shape) != len(dims):
                raise ShapeError(
                    f"--input-shape {inp.name}: rank {len(shape)} does not match the model's "
                    f"[{','.join(shown)}] (rank {len(dims)})"
                )
            for k, (d, v) in enumerate(zip(dims, shape)):
                if d.dim_value > 0 and d.dim_value != v:
                    raise ShapeError(
                        f"--input-shape {inp.name}: dim {k} is {v}, but the model fixes it to "
                        f"{d.dim_value} (model shape [{','.join(shown)}])"
                    )
        else:
            if not ttype.HasField("shape") or any(d.dim_value <= 0 for d in dims):
                example = ",".join(s if s.isdigit() else "1" for s in shown) or "1,3,224,224"
                raise ShapeError(
                    f"input {inp.name!r} has a dynamic shape [{','.join(shown)}]; "
                    f"pass --input-shape {inp.name}={example}"
                )
            shape = tuple(d.dim_value for d in dims)
        # Write the fixed shape into the model so folding and import see static shapes.
        ttype.ClearField("shape")
        for v in shape:
            ttype.shape.dim.add().dim_value = int(v)
        spec = InputSpec(inp.name, tuple(int(v) for v in shape), _dtype_name(ttype.elem_type))
        _check_input_size(spec)
        specs.append(spec)
    return specs


def _check_input_size(spec: InputSpec) -> None:
    """An input that cannot fit in memory (one copy of it is made for verification, more while
    running) is refused before anything is allocated."""
    import numpy as np

    try:
        item = np.dtype(spec.dtype).itemsize
    except TypeError:
        item = 4
    nbytes = int(np.prod([int(d) for d in spec.shape], dtype=object)) * item
    total = _memory_bytes()
    if nbytes > total // 4:
        raise ShapeError(
            f"input {spec.name!r} of shape {list(spec.shape)} {spec.dtype} needs {nbytes / 2**30:.1f} GiB, "
            f"more than a quarter of this machine's {total / 2**30:.0f} GiB memory"
        )


def _memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # noqa: BLE001  (psutil is a dependency; stay usable without it)
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def _fold_with_ort(model: onnx.ModelProto) -> Optional[onnx.ModelProto]:
    """Constant-fold shape subgraphs via onnxruntime's basic optimizations (ONNX ops only).

    A model with control flow is folded in a child process: onnxruntime 1.32 crashed (SIGSEGV)
    folding Silero VAD's nested ``If``s once its sample rate was a constant, which would have
    ended this process without a word."""
    with tempfile.TemporaryDirectory(prefix="tvmc-fold-") as tmp:
        src, dst = Path(tmp, "in.onnx"), Path(tmp, "folded.onnx")
        onnx.save(model, str(src))
        if any(n.op_type in ("If", "Loop", "Scan") for n in all_nodes(model.graph)):
            import subprocess
            import sys

            code = (f"import sys\n{inspect.getsource(_ort_fold_file)}\n"
                    "sys.exit(0 if _ort_fold_file(*sys.argv[1:]) else 1)")
            ok = subprocess.run([sys.executable, "-c", code, str(src), str(dst)],
                                capture_output=True, check=False).returncode == 0
        else:
            ok = _ort_fold_file(str(src), str(dst))
        return onnx.load(str(dst)) if ok else None


def _ort_fold_file(src, dst):
    """onnxruntime's basic optimizations of the model file ``src``, saved to ``dst``; False when
    onnxruntime cannot load it. Self-contained: also run as a child's whole program."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.optimized_model_filepath = dst
    opts.log_severity_level = 3
    try:
        ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception:  # noqa: BLE001  (the caller notes that folding did not happen)
        return False
    return True


def check_supported(model: onnx.ModelProto, path: Path, why: Optional[Mapping[str, str]] = None,
                    hint: str = "") -> None:
    """Refuse, in one line, every op type the importer cannot take (``why``: a reason by node
    name, for nodes a rewrite here could have taken but did not; ``hint``: what may help)."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    # The importer converts If itself (outside its converter map), into a Relax If.
    supported = set(_get_convert_map()) | {"If", "Constant"}
    missing: Dict[str, str] = {}
    for node in all_nodes(model.graph):
        if node.op_type not in supported and node.op_type not in missing:
            missing[node.op_type] = node.name or "(unnamed)"
    if missing:
        why = why or {}
        listed = "; ".join(f"{op} (e.g. node {name!r}{': not unrolled, ' + why[name] if name in why else ''})"
                           for op, name in sorted(missing.items()))
        import tvm

        raise UnsupportedOpError(
            f"{path}: unsupported ONNX ops: {listed}; TVM {tvm.__version__}'s Relax ONNX importer "
            f"has no converter for them{' (' + hint + ')' if hint else ''}"
        )


def prepare_onnx(
    path: str | os.PathLike, input_shapes: Optional[ShapeMap] = None, fold: bool = True,
    input_values: Optional[Mapping[str, Sequence]] = None,
) -> PreparedModel:
    """Read, check and prepare ``path`` for import (see the module docstring). ``input_values``:
    inputs fixed to values (a flat list each, or one value for every element), which leave the
    compiled model's inputs."""
    path = Path(path)
    original = read_onnx(path)
    original, upgraded_from = _upgrade_old_opset(original, path)
    model = onnx.ModelProto()
    model.CopyFrom(original)
    _initializers_are_not_inputs(model)
    given = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    bound = _bound_values(model, input_values or {}, given)
    inputs = [spec for spec in _fix_input_shapes(model, given, path) if spec.name not in bound]
    bind_inputs(model, bound)
    # Output / intermediate shapes may still name the old symbolic dims: let inference redo them.
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    notes = []
    if upgraded_from is not None:
        notes.append(f"upgraded from ONNX opset {upgraded_from} to {UPGRADE_OPSET} with onnx's version "
                     f"converter (onnxruntime, the reference, runs opset >= {MIN_ORT_OPSET})")
    inlined = inline_constant_ifs(model)
    folded = False
    if fold:
        result = _fold_with_ort(model)
        if result is None:
            notes.append("onnxruntime could not load the model; shape subgraphs were not folded")
        else:
            model, folded = result, True
            # Folding may list its constants as inputs (old IR versions): only the real ones stay.
            real = {spec.name for spec in inputs}
            keep = [i for i in model.graph.input if i.name in real]
            del model.graph.input[:]
            model.graph.input.extend(keep)
            # Folding can decide more conditions (shapes through computed pads, say).
            inlined += inline_constant_ifs(model)
    if bound:
        notes.append("input" + ("s " if len(bound) > 1 else " ") + ", ".join(
            f"{k}={_vals_text(v.reshape(-1)[:4].tolist())}{',...' if v.size > 4 else ''}" for k, v in bound.items())
            + " fixed: not inputs of the compiled model")
    if inlined:
        notes.append(f"{inlined} If node{'s' if inlined > 1 else ''} with a condition known from constants and "
                     "fixed shapes replaced by the branch taken")
    deciding = [f"input {name!r} decides {count} If node{'s' if count > 1 else ''} at run time: "
                f"--input-value {name}=V fixes it and compiles only the branch taken"
                for name, count in deciding_inputs(model).items()]
    notes.extend(deciding)
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:
        notes.append("ONNX shape inference failed on the prepared model")
    unrolled, not_unrolled = expand_recurrent(model)
    if unrolled:
        said = " and ".join(f"{n} {op}" for op, n in sorted(unrolled.items()))
        many = sum(unrolled.values()) > 1
        notes.append(f"{said} node{'s' if many else ''} unrolled over {'their' if many else 'its'} fixed sequence "
                     "length (TVM's importer has no recurrent ops; onnxruntime checks against the original)")
        model = onnx.shape_inference.infer_shapes(model)
    if einsums_as_matmuls(model):
        model = onnx.shape_inference.infer_shapes(model)
    if group_norms_unfolded(model):
        model = onnx.shape_inference.infer_shapes(model)
    check_supported(model, path, not_unrolled, hint="; ".join(deciding))
    outputs = []
    for out in model.graph.output:
        tt = out.type.tensor_type
        shape = tuple(d.dim_value for d in tt.shape.dim) if tt.HasField("shape") else None
        outputs.append(OutputSpec(out.name, shape, _dtype_name(tt.elem_type) if tt.elem_type else "float32"))
    return PreparedModel(path=path, sha256=file_sha256(path), model=model, original=original,
                         inputs=inputs, outputs=outputs, folded=folded, notes=notes,
                         upgraded=original.SerializeToString() if upgraded_from is not None else None,
                         bound=bound)


def _initializers_are_not_inputs(model: onnx.ModelProto) -> None:
    """Old exporters (IR version 3) list every weight as a graph input too; onnxruntime then uses
    the initializer unless fed, but the Relax importer makes each one a parameter of ``main``.
    Weights are weights: drop them from the inputs (IR >= 4 allows that)."""
    inits = {i.name for i in model.graph.initializer}
    if not any(i.name in inits for i in model.graph.input):
        return
    keep = [i for i in model.graph.input if i.name not in inits]
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = max(model.ir_version, 4)


MIN_ORT_OPSET = 7  # the oldest default-domain opset onnxruntime implements
UPGRADE_OPSET = 13


def _upgrade_old_opset(model: onnx.ModelProto, path: Path):
    """(model, None), or (the model converted to ``UPGRADE_OPSET``, its old opset) when its
    default-domain opset is older than onnxruntime runs."""
    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if version is None or version >= MIN_ORT_OPSET:
        return model, None
    from onnx import version_converter

    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    _initializers_are_not_inputs(plain)  # the converter trips over weights listed as inputs
    try:
        upgraded = version_converter.convert_version(plain, UPGRADE_OPSET)
        # The converter keeps the old IR version, which the new opset does not allow.
        upgraded.ir_version = max(upgraded.ir_version, helper.find_min_ir_version_for(
            [o for o in upgraded.opset_import if o.domain in ("", "ai.onnx")]))
        onnx.checker.check_model(upgraded)
    except Exception as err:  # noqa: BLE001  (the converter raises many kinds)
        lines = str(err).strip().splitlines()
        raise ModelError(
            f"{path} uses ONNX opset {version}; onnxruntime (the reference) runs opset >= {MIN_ORT_OPSET} "
            f"and onnx's version converter could not upgrade it ({lines[-1] if lines else type(err).__name__})"
        ) from None
    return upgraded, version


def load_onnx(path: str | os.PathLike, input_shapes: Optional[ShapeMap] = None):
    """ONNX file -> Relax IRModule with its weights embedded as constants."""
    return prepare_onnx(path, input_shapes).to_relax()


# ---- inspection ---------------------------------------------------------------------------------

def value_shapes(model: onnx.ModelProto) -> Dict[str, tuple]:
    """Shape of every graph input, output and inferred value of ``model``, by name."""
    shapes: Dict[str, tuple] = {}
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = tuple(d.dim_value for d in tt.shape.dim)
    return shapes


def layer_table(prepared: PreparedModel) -> List[dict]:
    """Per conv/dense layer: op, name, params, MACs (from shapes after inference)."""
    model = prepared.model
    inits = {i.name: numpy_helper.to_array(i).shape for i in model.graph.initializer}
    shapes: Dict[str, tuple] = {**inits, **value_shapes(model)}
    rows = []
    for node in model.graph.node:
        params = int(sum(np.prod(inits[i]) for i in node.input if i in inits))
        macs = 0
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if w and out:
                if node.op_type == "Conv":
                    macs = int(np.prod(out)) * int(np.prod(w[1:]))
                else:
                    macs = int(np.prod(shapes.get(node.input[0], (0,)))) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes.get(node.input[0]), shapes.get(node.output[0])
            if a and out:
                macs = int(np.prod(out)) * int(a[-1])
        if params or macs:
            rows.append(
                {"name": node.name or node.output[0], "op": node.op_type, "params": params, "macs": macs}
            )
    return rows


def op_histogram(model: onnx.ModelProto) -> Dict[str, int]:
    return dict(Counter(n.op_type for n in all_nodes(model.graph)).most_common())
