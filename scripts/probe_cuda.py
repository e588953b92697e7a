"""Where the time of one multi-tensor seeded call goes (profiler table), at several densities."""

import statistics
import sys

import torch

sys.path.insert(0, "scripts")
from llama8b import linear_shapes  # noqa: E402

from spra_tools import ops  # noqa: E402
from spra_tools.support import as_int64, tensor_key  # noqa: E402

assert ops.backend_for("cuda") == "cuda"  # loads the compiled kernels behind torch.ops.spra_tools
names = [(n, s[0] * s[1]) for n, s in linear_shapes()]
keys = [as_int64(tensor_key(0, n)) for n, _ in names]
for d in (1e-4, 1e-3, 1e-2, 5e-2):
    args = (torch.empty(0, device="cuda"), keys, [x for _, x in names], [d] * len(names))
    for _ in range(3):
        torch.ops.spra_tools.seeded_indices(*args)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = torch.ops.spra_tools.seeded_indices(*args)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    print(f"density {d:g}: {out.numel():,} indices in {statistics.median(ts):.3f} ms (events)")
with torch.profiler.profile(
    activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
) as prof:
    for _ in range(5):
        torch.ops.spra_tools.seeded_indices(*args)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=6))
