"""Write tests/vectors/seeded_v1.json: test vectors that pin the seeded-support scheme v1.

The vectors are produced by `spra_tools.support.seeded_indices` (the numpy executable spec) and
committed; tests read the committed file and never regenerate it. Re-run this script only to
check that the committed vectors still derive from the code (the output must not change):

    python scripts/make_support_vectors.py            # rewrites the file
    python scripts/make_support_vectors.py --check    # exits 1 if the file would change

Integers above 2**53 (tensor keys, sums) are written as hex strings so that any JSON reader can
load them without loss; seeds are plain JSON integers (up to 2**64 - 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from spra_tools import support as sup

OUT = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "seeded_v1.json"
FULL_LIMIT = 2000  # cases with at most this many indices store them all
EDGE = 64  # otherwise: the first and last EDGE indices, a sum and a hash

# (seed, name, shape, density); shapes only fix numel, the scheme sees the flat index space.
CASES = [
    (0, "model.layers.0.self_attn.q_proj.weight", (4096, 4096), 0.01),
    (1, "model.layers.0.self_attn.q_proj.weight", (4096, 4096), 0.01),
    (2**64 - 1, "lm_head.weight", (4096, 4096), 1e-5),
    (1, "w", (1,), 1.0),
    (1, "w", (1,), 0.5),
    (2**63 + 5, "bias", (5,), 0.5),
    (0, "bias", (5,), 1.0),
    (7, "norm.weight", (300,), 0.25),
    (2**64 - 1, "模型.层/ünïcødé.weight", (1000,), 0.3),
    (0, "model.embed_tokens.weight", (256, 256), 0.01),
    (2**63 + 5, "model.embed_tokens.weight", (65536,), 0.5),
    (1, "x", (65536 * 3 + 17,), 0.001),
    (2**64 - 1, "x", (65536 * 3 + 17,), 0.5),
    (0, "x", (65536 * 3 + 17,), 1e-5),
    (2, "y", (65536 * 3 + 17,), 1.0),
    (2, "odd", (65537,), 0.5),
    (5, "tail", (65536 * 2 + 3,), 0.7),
    (2**63 + 5, "vec", (70000,), 0.05),
    (0, "empty", (0,), 0.1),
]


def _u64_hex(x: int) -> str:
    return f"{x & (2**64 - 1):016x}"


def make_case(seed: int, name: str, shape: tuple[int, ...], density: float) -> dict:
    numel = math.prod(shape)
    idx = sup.seeded_indices(seed, name, numel, density)
    case = {
        "seed": seed,
        "name": name,
        "shape": list(shape),
        "numel": numel,
        "density": density,
        "tensor_key": _u64_hex(sup.tensor_key(seed, name)),
        "count": int(idx.size),
    }
    if idx.size <= FULL_LIMIT:
        case["indices"] = idx.tolist()
    else:
        case["first"] = idx[:EDGE].tolist()
        case["last"] = idx[-EDGE:].tolist()
        case["sum_mod_2_64"] = _u64_hex(int(idx.astype(np.uint64).sum(dtype=np.uint64)))
        case["sha256_i64le"] = hashlib.sha256(idx.astype("<i8").tobytes()).hexdigest()
    return case


def render() -> str:
    head = {
        "scheme": sup.SCHEME,
        "description": (
            "Seeded-support test vectors (docs/FORMAT.md section 4). For each case: seed (JSON integer), "
            "UTF-8 tensor name, shape, numel, density, tensor_key (16 hex digits), count. Cases with at most "
            f"{FULL_LIMIT} indices list them all in 'indices'; larger ones give the first and last {EDGE} "
            "indices, the sum of all indices mod 2**64 (16 hex digits) and the SHA-256 of all indices as "
            "int64 little-endian bytes."
        ),
        "generator": "scripts/make_support_vectors.py",
    }
    lines = ["{"]
    lines += [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in head.items()]
    lines.append('  "cases": [')
    cases = [json.dumps(make_case(*c), ensure_ascii=False, separators=(", ", ": ")) for c in CASES]
    lines.append(",\n".join(f"    {c}" for c in cases))
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed file, write nothing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    text = render()
    if args.check:
        same = args.out.exists() and args.out.read_text(encoding="utf-8") == text
        print(f"{args.out}: {'up to date' if same else 'DIFFERS'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {len(CASES)} cases to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
