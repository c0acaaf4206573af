"""Evaluation data for a byte-level file-type model (Google's Magika): real files of this
machine, read as Magika reads them, labelled by onnxruntime's top-1 on the model as given.

Usage:
    python scripts/file_type_data.py MODEL.onnx OUT.npz [--roots /usr/share /usr/lib /etc] [--per-kind 8]

Each file gives one row of 2048 int32 tokens: the first 1024 bytes of its first 4096 after
leading whitespace, then the last 1024 of its last 4096 before trailing whitespace (the whole
file stripped both ways when it is no larger than 4096 bytes), padded with token 256 (after the
beginning, before the end). Files are taken up to ``--per-kind`` per file-name extension, in
sorted path order, so every kind of file present counts, not only the most common. The labels are
onnxruntime's argmax (``tvm-compress bench --eval`` then reports top-1 agreement with it).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

BLOCK, BEG, END, PAD = 4096, 1024, 1024, 256


def features(path: Path) -> np.ndarray:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(BLOCK)
        f.seek(max(0, size - BLOCK))
        tail = f.read(BLOCK)
    if size <= BLOCK:
        head = tail = head.strip()
    else:
        head, tail = head.lstrip(), tail.rstrip()
    beg = list(head[:BEG]) + [PAD] * (BEG - len(head[:BEG]))
    end_bytes = tail[-END:] if tail else b""
    end = [PAD] * (END - len(end_bytes)) + list(end_bytes)
    return np.asarray(beg + end, dtype=np.int32)


def pick(roots, per_kind: int, limit: int):
    by_kind = defaultdict(list)
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath, name)
                try:
                    if not p.is_file() or p.is_symlink() or p.stat().st_size < 8:
                        continue
                except OSError:
                    continue
                kind = p.suffix.lower() or "(none)"
                if len(by_kind[kind]) < per_kind:
                    by_kind[kind].append(p)
    files = [p for kind in sorted(by_kind) for p in by_kind[kind]]
    return files[:limit]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--roots", nargs="+", default=["/usr/share", "/usr/lib", "/etc"])
    ap.add_argument("--per-kind", type=int, default=8)
    ap.add_argument("--limit", type=int, default=512)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tvm_compress.verify import ort_session

    files = pick(args.roots, args.per_kind, args.limit)
    rows = []
    for p in files:
        try:
            rows.append(features(p))
        except OSError:
            continue
    x = np.stack(rows)
    sess = ort_session(args.model)
    name = sess.get_inputs()[0].name
    labels = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))]).argmax(1)
    np.savez(args.out, **{name: x, "labels": labels})
    print(f"{len(x)} files, {len(set(labels.tolist()))} distinct labels -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
