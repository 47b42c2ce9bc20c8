#!/usr/bin/env python3
"""Compare the f32 tensors two safetensors files share (standard library only, no numpy).

usage: compare_safetensors.py GOT WANT [PREFIX ...]

Prints one JSON object: per-prefix worst relative error, each tensor against its own
largest magnitude, gradients (`grad.*`) against at least 1e-3 of the largest gradient
(the fixtures README's well-posed comparison), and the tensor where the worst occurs.
"""
import json
import struct
import sys
from array import array


def read(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for name, t in header.items():
        if name == "__metadata__" or t.get("dtype") != "F32":
            continue
        a, b = t["data_offsets"]
        v = array("f")
        v.frombytes(data[a:b])
        if sys.byteorder != "little":
            v.byteswap()
        out[name] = v
    return out


def main():
    got, want = read(sys.argv[1]), read(sys.argv[2])
    prefixes = sys.argv[3:] or ["out.", "grad.", "after_adamw."]
    grad_max = max((max((abs(x) for x in v), default=0.0) for k, v in want.items() if k.startswith("grad.")), default=0.0)
    report = {"compared": 0, "missing": []}
    for p in prefixes:
        worst, where = 0.0, None
        for name, w in want.items():
            if not name.startswith(p):
                continue
            g = got.get(name)
            if g is None or len(g) != len(w):
                report["missing"].append(name)
                continue
            report["compared"] += 1
            scale = max((abs(x) for x in w), default=0.0)
            if p == "grad.":
                scale = max(scale, 1e-3 * grad_max)
            scale = max(scale, 1e-30)
            err = max((abs(a - b) for a, b in zip(g, w)), default=0.0) / scale
            if err != err:  # NaN
                err = float("inf")
            if err > worst or where is None:
                worst, where = err, name
        report[p.rstrip(".")] = {"max_rel_err": worst if worst != float("inf") else "inf", "worst_tensor": where}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
