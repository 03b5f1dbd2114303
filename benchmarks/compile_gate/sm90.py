"""Compile captured launch specialisations for a GPU target on a CPU machine and read the hardware cost.

For each :class:`benchmarks.compile_gate.launch_capture.Spec` (as JSON): ``triton.compile`` for
``GPUTarget("cuda", arch, 32)``, then ``ptxas -v`` (the ptxas Triton ships, same flags as Triton's own cubin
step) for registers, spills and stack; shared memory is Triton's dynamic allocation plus any static one. Results
are cached as JSON under ``.cache/compile_gate/`` keyed by a hash of the kernel's source (Triton's ``cache_key``,
which covers the functions it calls), the specialisation, the target, and the Triton and ptxas versions.

Must run without ``TRITON_INTERPRET`` (the interpreter has no compiler): the report and the CI test call
``python -m benchmarks.compile_gate.sm90 SPECS.json OUT.json`` in a subprocess with that variable removed.

H100 SXM occupancy (per SM): 65,536 registers allocated per warp in units of 256, 2,048 threads, 32 CTAs,
228 KB = 233,472 B of shared memory (1 KB of it reserved per CTA), at most 232,448 B for one CTA.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import ROOT

CACHE_DIR = ROOT / ".cache" / "compile_gate"

REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers per warp are allocated in these units
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
SMEM_PER_SM = 233472
SMEM_RESERVED_PER_CTA = 1024
SMEM_PER_CTA = 232448
N_SM = 132


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> dict:
    """Resident CTAs per SM as limited by registers, threads and shared memory, and the least of them."""
    regs_per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_threads = THREADS_PER_SM // (32 * num_warps)
    by_smem = 0 if smem > SMEM_PER_CTA else SMEM_PER_SM // (smem + SMEM_RESERVED_PER_CTA)
    return dict(by_regs=by_regs, by_threads=by_threads, by_smem=by_smem,
                ctas=min(by_regs, by_threads, by_smem, CTAS_PER_SM))


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> dict:
    """Registers, static shared memory, stack frame and spill bytes from ``ptxas -v`` output."""
    regs = _PTXAS_REGS.search(log)
    if regs is None:
        raise ValueError(f"no register count in the ptxas log:\n{log}")
    smem = _PTXAS_SMEM.search(log)
    stack = _PTXAS_STACK.search(log)
    frame, stores, loads = (int(v) for v in stack.groups()) if stack else (0, 0, 0)
    return dict(regs=int(regs.group(1)), static_smem=int(smem.group(1)) if smem else 0,
                stack=frame, spill_stores=stores, spill_loads=loads)


def _jit_function(kernel: str):
    module, name = kernel.split(":")
    return getattr(importlib.import_module(module), name)


def _versions(arch: int) -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas_version
    return f"triton {triton.__version__}; {get_ptxas_version(arch).strip().splitlines()[-1]}"


def cache_key(spec: dict, arch: int) -> str:
    """Hash of the kernel's source (with the functions it calls), the specialisation, target and tools."""
    fn = _jit_function(spec["kernel"])
    text = json.dumps([fn.cache_key, spec, arch, _versions(arch)], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _ptxas_verbose(ptx: str, arch: int, fp_fusion: bool) -> str:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v",
               "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
               "-o", str(src.with_suffix(".o"))]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def compile_spec(spec: dict, arch: int = 90) -> dict:
    """Compile one specialisation for sm_``arch``; -> registers, spills, shared memory (or ``error``)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource

    fn = _jit_function(spec["kernel"])
    backend = CUDABackend(GPUTarget("cuda", arch, 32))
    attrs = {(int(i),): backend.parse_attr(a) for i, a in spec["attrs"].items()}
    src = ASTSource(fn=fn, signature=spec["signature"], constexprs=spec["constexprs"], attrs=attrs)
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # Triton's own ptxas -v run prints its report
            k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                               options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
        report = log.getvalue() if "Used" in log.getvalue() else None  # None: Triton's cache had the cubin
        out = parse_ptxas(report or _ptxas_verbose(k.asm["ptx"], arch, k.metadata.enable_fp_fusion))
    except Exception as e:  # noqa: BLE001 -- a compile error is a result the gate reports
        return dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}",
                    compile_s=time.perf_counter() - t0)
    out.update(shared=k.metadata.shared + out["static_smem"], compile_s=time.perf_counter() - t0)
    return out


def _cached_compile(spec: dict, arch: int, cache_dir: Path) -> dict:
    path = cache_dir / f"{cache_key(spec, arch)}.json"
    if path.exists():
        return dict(json.loads(path.read_text()), cached=True)
    result = compile_spec(spec, arch)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return dict(result, cached=False)


def compile_all(specs: list[dict], arch: int = 90, cache_dir: Path = CACHE_DIR, jobs: int | None = None) -> list[dict]:
    """Compile (or read from the cache) every spec, in parallel processes; results in the same order."""
    jobs = jobs or os.cpu_count() or 1
    with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_cached_compile, specs, [arch] * len(specs), [Path(cache_dir)] * len(specs)))


def run_subprocess(specs: list[dict], arch: int = 90, cache_dir: Path = CACHE_DIR,
                   timeout: float | None = None) -> list[dict]:
    """:func:`compile_all` in a fresh interpreter without ``TRITON_INTERPRET`` (callers run under it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "specs.json", Path(tmp) / "results.json"
        src.write_text(json.dumps(specs))
        subprocess.run([sys.executable, "-m", "benchmarks.compile_gate.sm90", str(src), str(dst), "--arch", str(arch),
                        "--cache-dir", str(cache_dir)], cwd=ROOT, env=env, check=True, timeout=timeout)
        return json.loads(dst.read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("specs", help="JSON list of specs (Spec.to_json())")
    parser.add_argument("out", help="JSON list of results, same order")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--cache-dir", default=str(CACHE_DIR))
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile for a GPU")
    specs = json.loads(Path(args.specs).read_text())
    Path(args.out).write_text(json.dumps(compile_all(specs, args.arch, Path(args.cache_dir), args.jobs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
