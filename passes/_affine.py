"""Per-channel affine steps: which element-wise ops with a constant are ``v * scale + shift``
with one (scale, shift) per channel of ``v``. Shared by ``fold``, ``conv_transpose_to_conv`` and
``conv1d_to_conv2d`` (the last two fold a layer's affine ops and activation with ``follow_chain``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
import tvm
from tvm import relax

from tvm_compress.relax_utils import const_value, emit_like, is_constant, tensor_shape

ADD, SUBTRACT, MULTIPLY, DIVIDE = (tvm.ir.Op.get(f"relax.{n}") for n in ("add", "subtract", "multiply", "divide"))
BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")
_ARITH = {"add": ADD, "sub": SUBTRACT, "mul": MULTIPLY, "div": DIVIDE}


@dataclass
class Step:
    """``v * scale + shift``, one value per channel (float64)."""

    op: str
    scale: np.ndarray
    shift: np.ndarray


@dataclass
class Refusal:
    """An element-wise op with a constant that does not fold exactly, and why."""

    op: str
    reason: str


def op_name(call) -> Optional[str]:
    """``add`` / ``sub`` / ``mul`` / ``div`` for the four arithmetic ops, else None."""
    if not isinstance(call, relax.Call):
        return None
    return next((n for n, op in _ARITH.items() if call.op.same_as(op)), None)


def channel_vector(expr, shape: Sequence[int], axis: int) -> Union[np.ndarray, str]:
    """The constant ``expr`` as one float64 value per channel (``axis``) of a tensor of
    ``shape`` it broadcasts against, or the reason it is not one."""
    if not is_constant(expr):
        return "not a constant"
    value = const_value(expr)
    if value.dtype.kind != "f":
        return f"a {value.dtype} constant"
    rank, channels = len(shape), int(shape[axis])
    if value.ndim > rank:
        return "the constant broadcasts the tensor to more dimensions"
    dims = (1,) * (rank - value.ndim) + tuple(value.shape)
    for i, d in enumerate(dims):
        if i != axis % rank and d != 1:
            return f"the constant varies along axis {i}, not per channel (shape {tuple(value.shape)})"
    if dims[axis % rank] not in (1, channels):
        return f"the constant has shape {tuple(value.shape)}"
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def arith_step(call, var, shape: Sequence[int], axis: int) -> Union[Step, Refusal, None]:
    """The affine step ``call`` applies to ``var`` (one of its arguments; the other a
    constant), a refusal, or None when ``call`` is no such op (e.g. its other argument is a
    tensor, or it divides a constant by ``var``)."""
    name = op_name(call)
    if name is None or len(call.args) != 2:
        return None
    a, b = call.args
    first = a.same_as(var)
    other = b if first else a
    if not (first or b.same_as(var)) or not is_constant(other):
        return None
    if name == "div" and not first:
        return None  # k / v is not affine in v
    k = channel_vector(other, shape, axis)
    if isinstance(k, str):
        return Refusal(name, k)
    ones, zeros = np.ones_like(k), np.zeros_like(k)
    if name == "add":
        return Step(name, ones, k)
    if name == "sub":
        return Step(name, ones, -k) if first else Step(name, -ones, k)
    if name == "mul":
        return Step(name, k, zeros)
    if not np.all(k != 0):
        return Refusal(name, "divides by zero in some channel")
    return Step(name, 1.0 / k, zeros)


def batch_norm_step(call, channels: int, axis: int, rank: int) -> Union[Step, Refusal, None]:
    """Inference batch norm over ``axis`` with constant parameters as an affine step."""
    if not (isinstance(call, relax.Call) and call.op.same_as(BATCH_NORM)):
        return None
    if int(call.attrs.axis) % rank != axis % rank:
        return Refusal("batch_norm", "normalizes another axis than the channels")
    params = [channel_vector(p, [channels], 0) for p in call.args[1:5]]
    if any(isinstance(p, str) for p in params) or any(not is_constant(p) or len(p.ty.shape) != 1
                                                      for p in call.args[1:5]):
        return Refusal("batch_norm", "its parameters are not constant per-channel vectors")
    gamma, beta, mean, var = params
    gamma = gamma if call.attrs.scale else np.ones(channels)
    beta = beta if call.attrs.center else np.zeros(channels)
    k = gamma / np.sqrt(var + float(call.attrs.epsilon))
    return Step("batch_norm", k, beta - mean * k)


# Element-wise activations a chain may end in (they commute with reshapes of the layout).
ACTIVATIONS = [tvm.ir.Op.get(f"relax.{n}") for n in ("nn.relu", "sigmoid", "nn.silu", "tanh")]


class AffineChain:
    """The per-channel affine ops and one element-wise activation after a layer, folded:
    ``act(y * scale + shift)``; the scale can join the layer's weights and the shift become its
    bias (then quantization fuses them into the convolution's epilogue)."""

    def __init__(self, channels: int):
        self.scale = np.ones(channels)
        self.shift = np.zeros(channels)
        self.act = None
        self.vars = []  # bindings folded away; the last one's var now names the result

    def absorb(self, value, var, prev, shape, bindings, users) -> bool:
        """Fold ``value`` (bound to ``var``, reading ``prev`` of ``shape``) into the chain."""
        if not isinstance(value, relax.Call) or self.act is not None:
            return False
        step = arith_step(value, prev, shape, 1) or batch_norm_step(value, shape[1], 1, len(shape))
        if isinstance(step, Step):
            if value.op.same_as(BATCH_NORM):
                # The normalized value (item 0) must have one reader; the running statistics
                # (items 1, 2, which the importer binds) none.
                items = [(u, bindings.get(u)) for u in users.get(var, [])]
                main = [u for u, v in items if isinstance(v, relax.TupleGetItem) and v.index == 0]
                if len(main) != 1 or not all(isinstance(v, relax.TupleGetItem) and not users.get(u)
                                             for u, v in items if u not in main):
                    return False
                self.vars.extend(u for u, _ in items if u not in main)  # the unused statistics go too
                self.vars.append(var)
                var = main[0]  # the TupleGetItem binding is folded too
            self.scale, self.shift = self.scale * step.scale, self.shift * step.scale + step.shift
        elif step is None and any(value.op.same_as(a) for a in ACTIVATIONS):
            self.act = value.op
        else:
            return False
        self.vars.append(var)
        return True


def follow_chain(var, channels: int, bindings, users) -> AffineChain:
    """The chain of ops after ``var`` (channel axis 1) that ``AffineChain`` can fold; ``bindings``
    (var -> value) and ``users`` (``relax.analysis.udchain``) of its dataflow block."""
    chain = AffineChain(channels)
    shape = tensor_shape(var)
    while True:
        nxt = users.get(var, [])
        # Only a value nothing else reads can be folded (dataflow vars: no uses outside).
        if len(nxt) != 1 or not isinstance(var, relax.DataflowVar):
            return chain
        if not chain.absorb(bindings.get(nxt[0]), nxt[0], var, shape, bindings, users):
            return chain
        var = chain.vars[-1]


class ChainRewrite:
    """What the layer rewriters that take a layer's affine chain along (``conv1d_to_conv2d``,
    ``conv_transpose_to_conv``) share, mixed into their ``PyExprMutator``: the bindings and
    users ``follow_chain`` reads, the chain's ops to drop, and the chain's bias and activation
    after the new layer."""

    def init_chain(self) -> None:
        self.count = 0
        self.bindings = {}
        self.users = {}
        self.skip = set()

    def track_block(self, block) -> None:
        self.bindings.update({b.var: b.value for b in block.bindings})
        self.users.update(relax.analysis.udchain(block))

    def emit_chain(self, y, chain: AffineChain, bias: np.ndarray):
        """``y`` + ``bias`` (the chain's shift, shaped for ``y``) and the chain's activation."""
        if chain.shift.any():
            y = self.builder_.emit(relax.op.add(y, relax.const(bias)))
        if chain.act is not None:
            y = self.builder_.emit(relax.Call(chain.act, [y]))
        return y

    def replace_chain(self, binding, chain: AffineChain, value):
        """Bind ``value`` in place of the chain's last var (of the same kind: a function output
        stays one) and drop the chain's ops; that var."""
        result = chain.vars[-1] if chain.vars else binding.var
        self.set_var_remap(result, emit_like(self.builder_, result, value))
        self.skip.update(chain.vars)
        self.count += 1
        return result

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        """Every Relax function of ``mod`` through this rewriter; ``mod`` itself when nothing
        was rewritten."""
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                new = self.visit_expr(func)
                self.builder_.update_func(gv, relax.analysis.remove_all_unused(new))
        return self.builder_.get() if self.count else mod
