"""One GPU call for the attach kernels: build, test, benchmark, profile; everything written under --out.

    python scripts/probe_attach.py --out /tmp/probe            # on the H200, about 6 minutes

Stages, in this order, each in its own process with its log in OUT/<stage>.log; a stage that fails
or runs out of time is recorded and the next one still runs (all share one deadline, --budget):

1. build    — `python -m spra_tools build-ext` with SPRA_TOOLS_BUILD_EXT=1 (a failed build is an error,
              and every later stage sets it too, so nothing silently falls back to the reference);
2. tests    — `pytest -q -m cuda tests/test_kernels.py tests/test_ops.py tests/test_live.py`;
3. apply    — `scripts/bench_apply.py` at 0.1 % and 1 %;
4. live     — `scripts/bench_live.py`: attach / swap, staged swaps, PEFT's hot-swap;
5. ncu      — Nsight Compute (`--clock-control none --set full`) on each of our kernels and the
              flat-buffer ceilings once (`bench_apply.py --profile`, NVTX range "profile"), then a
              summary of duration, DRAM and L2 traffic, occupancy, registers and the top warp stalls.

The last lines printed are a short table: stage, status, seconds, and the numbers that matter.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Raw ncu metrics worth reading for a random read-modify-write kernel (missing ones are skipped).
METRICS = {
    "gpu__time_duration.sum": "duration",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM % peak",
    "dram__bytes_read.sum": "DRAM read",
    "dram__bytes_write.sum": "DRAM write",
    "lts__t_sectors_srcunit_tex_op_read.sum": "L2 sectors read",
    "lts__t_sectors_srcunit_tex_op_write.sum": "L2 sectors written",
    "lts__t_sector_hit_rate.pct": "L2 hit %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy %",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical occupancy %",
    "launch__registers_per_thread": "registers",
    "launch__shared_mem_per_block_dynamic": "dynamic smem",
    "launch__grid_size": "grid",
    "launch__block_size": "block",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "SM % peak",
}
STALL = re.compile(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget", type=float, default=350.0, help="seconds for all stages together")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget
    env = {**os.environ, "PYTHONPATH": str(REPO), "SPRA_TOOLS_BUILD_EXT": "1", "PYTHONUNBUFFERED": "1"}
    env.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    py = sys.executable
    results = []

    def stage(name, cmd, limit):
        results.append(run(name, cmd, limit, deadline, out, env))
        return results[-1]

    stage("build", [py, "-m", "spra_tools", "build-ext"], 200)
    stage("tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_kernels.py",
                    "tests/test_ops.py", "tests/test_live.py"], 90)  # fmt: skip
    stage("apply", [py, "scripts/bench_apply.py", "--device", "cuda", "--density", "0.001", "0.01", "--repeat",
                    "20"], 90)  # fmt: skip
    stage("live", [py, "scripts/bench_live.py", "--repeat", "10", "--swaps", "200"], 100)
    ncu = shutil.which("ncu") or next((str(p) for p in Path("/usr/local/cuda/bin").glob("ncu")), None)
    if ncu:
        report = out / "attach"
        r = stage("ncu", [ncu, "--clock-control", "none", "--set", "full", "--nvtx", "--nvtx-include", "profile/",
                          "--force-overwrite", "-o", str(report), py, "scripts/bench_apply.py", "--device", "cuda",
                          "--profile", "--density", "0.001"], 150)  # fmt: skip
        if r["status"] == "ok":
            r["summary"] = summarize(ncu, report.with_suffix(".ncu-rep"), out, env)
    else:
        results.append({"stage": "ncu", "status": "skipped: ncu not found", "seconds": 0.0, "lines": []})

    print("\n# probe_attach summary (logs and reports in " + str(out) + ")\n")
    print("| stage | status | seconds |\n|---|---|---|")
    for r in results:
        print(f"| {r['stage']} | {r['status']} | {r['seconds']:.0f} |")
    for r in results:
        lines = r.get("summary") or r["lines"]
        if lines:
            print(f"\n## {r['stage']}\n" + "\n".join(lines))


def run(name, cmd, limit, deadline, out, env) -> dict:
    """Run one stage with its log in OUT/<name>.log; never raises."""
    left = deadline - time.monotonic()
    if left < 30:
        return {"stage": name, "status": "skipped: out of time", "seconds": 0.0, "lines": []}
    limit = min(limit, left)
    log = out / f"{name}.log"
    t0 = time.monotonic()
    try:
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"timed out after {limit:.0f} s"
    except OSError as e:
        status = f"could not start: {e}"
    text = log.read_text(errors="replace")
    lines = highlights(name, text) if status == "ok" else text.splitlines()[-6:]
    return {"stage": name, "status": status, "seconds": time.monotonic() - t0, "lines": lines}


def highlights(name: str, text: str) -> list[str]:
    """The lines of a stage's log that the summary shows."""
    lines = text.splitlines()
    if name == "tests":
        return [x for x in lines if re.search(r"\b(passed|failed|error|skipped)\b", x)][-3:] + [
            x for x in lines if x.startswith(("FAILED", "ERROR"))
        ][:10]
    if name == "apply":
        keep = (
            "| attach",
            "| detach",
            "| gather",
            "| ceiling",
            "| anchor",
            "attach:",
            "Llama-8B",
            "Launch",
            "| threads",
        )
        return [x for x in lines if x.startswith(keep)]
    if name == "live":
        return [x for x in lines if x.startswith(("| spra", "| staged", "| PEFT", "base bit-exact", "a staged"))]
    return [x for x in lines if "error" in x.lower()][:5] or lines[-3:]


def summarize(ncu: str, report: Path, out: Path, env) -> list[str]:
    """Key counters per profiled kernel, from the report's raw page (also saved as CSV and text)."""
    try:
        raw = subprocess.run([ncu, "--import", str(report), "--page", "raw", "--csv"], capture_output=True, text=True,
                             env=env, timeout=120).stdout  # fmt: skip
        (out / "attach_raw.csv").write_text(raw)
        details = subprocess.run([ncu, "--import", str(report), "--page", "details"], capture_output=True, text=True,
                                 env=env, timeout=120).stdout  # fmt: skip
        (out / "attach_details.txt").write_text(details)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [f"could not read the report: {e}"]
    rows = list(csv.reader(io.StringIO(raw)))
    if len(rows) < 3:
        return ["the report holds no kernels (see ncu.log: counters may be unavailable on this machine)"]
    header, units, kernels = rows[0], rows[1], rows[2:]
    col = {h: i for i, h in enumerate(header)}
    lines = []
    for k in kernels:
        name = k[col["Kernel Name"]] if "Kernel Name" in col else "?"
        short = re.sub(r"\(.*", "", name.replace("(anonymous namespace)::", ""))[:90]
        cells = [f"{label} {k[col[m]]} {units[col[m]]}".strip() for m, label in METRICS.items() if m in col]
        stalls = sorted(
            ((_number(k[i]), STALL.match(h).group(1)) for h, i in col.items() if STALL.match(h) and _number(k[i])),
            reverse=True,
        )[:4]
        lines.append(f"- {short}: " + "; ".join(cells))
        if stalls:
            lines.append(
                "  top stalls (cycles per issued instruction): " + ", ".join(f"{s} {v:.1f}" for v, s in stalls)
            )
    return lines


def _number(s: str) -> float | None:
    """A report cell as a number (ncu may print thousands separators), or None."""
    try:
        return float(s.replace(",", ""))
    except ValueError:
        return None


if __name__ == "__main__":
    main()
