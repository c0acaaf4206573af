"""Arguments and helpers several commands share."""

from __future__ import annotations

import argparse


def log_fn(quiet: bool):
    from tvm_compress.console import Console

    return Console(quiet)


def shapes(args) -> dict:
    from tvm_compress.loader import parse_shape_arg

    out = {}
    for text in args.input_shape or []:
        name, shape = parse_shape_arg(text)
        out[name] = shape
    return out


def values(args) -> dict:
    from tvm_compress.loader import parse_value_arg

    return dict(parse_value_arg(text) for text in args.input_value or [])


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="ONNX model file")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="NAME=D0,D1,...",
        help="fix an input's shape (repeat once per input); needed for dynamic dims",
    )
    p.add_argument(
        "--input-value",
        action="append",
        metavar="NAME=V[,V...]",
        help="fix an input to a value (one value fills it), e.g. a sample rate: it becomes a "
             "constant, branches (If) it decides are taken, and it is no longer an input",
    )


def add_target_args(p: argparse.ArgumentParser) -> None:
    from tvm_compress.targets import target_names

    p.add_argument(
        "--target",
        default="x86",
        metavar="NAME",
        help=f"target preset (default x86); one of: {', '.join(target_names())}",
    )
    p.add_argument("--targets-file", action="append", metavar="TOML", help="extra target presets")


def add_rpc_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("boards over TVM RPC")
    g.add_argument("--rpc-tracker", metavar="HOST:PORT", help="TVM RPC tracker the boards registered with")
    g.add_argument("--rpc-key", metavar="KEY", help="device key of the boards (with --rpc-tracker)")
    return g


def rpc_spec(args):
    from tvm_compress.remote import parse_tracker

    if not args.rpc_tracker:
        if args.rpc_key:
            from tvm_compress.errors import RemoteError

            raise RemoteError("--rpc-key needs --rpc-tracker HOST:PORT")
        return None
    return parse_tracker(args.rpc_tracker, args.rpc_key)
