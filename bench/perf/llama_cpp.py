"""llama.cpp as a peer on this machine: built once from the `llama-cpp-python` source package (which vendors
llama.cpp), the checkpoint converted to GGUF in the peer formats with llama.cpp's own converter and quantizer, and
its `llama-batched-bench` run on a workload shaped like ours.

Everything lives in ~/.cache/compactlm/llama.cpp-VERSION (or $COMPACTLM_LLAMA_CPP): src/ (the source package),
build/bin/ (llama-batched-bench, llama-quantize), pydeps/ (sentencepiece, which the converter imports; installed
there so that our venv stays as pinned), gguf/ (converted models, by checkpoint hash and format).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"
FORMATS = {"F32": "f32", "BF16": "bf16", "Q8_0": "q8_0", "Q4_0": None, "Q4_K_M": None}
"""GGUF format -> the converter's --outtype (None: quantized from F32 by llama-quantize)."""
TARGETS = ("llama-batched-bench", "llama-quantize")


def home() -> Path:
    default = Path.home() / ".cache" / "compactlm" / f"llama.cpp-{VERSION}"
    return Path(os.environ.get("COMPACTLM_LLAMA_CPP", default))


def _run(cmd: list, log: Path, env: dict | None = None) -> None:
    with open(log, "a") as out:
        done = subprocess.run([str(c) for c in cmd], stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(map(str, cmd))}; see {log}")


def source() -> Path:
    """The vendored llama.cpp tree of the source package, downloaded and unpacked once."""
    root = home() / "src"
    tree = root / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    root.mkdir(parents=True, exist_ok=True)
    print(f"downloading llama-cpp-python {VERSION} (source package) into {root}", flush=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", root]
    _run([*pip, f"llama-cpp-python=={VERSION}"], home() / "build.log")
    with tarfile.open(next(root.glob(f"llama_cpp_python-{VERSION}.tar.gz"))) as archive:
        archive.extractall(root, filter="data")
    return tree


def built() -> bool:
    return all((home() / "build" / "bin" / t).is_file() for t in TARGETS)


def tools() -> Path:
    """build/bin with llama-batched-bench and llama-quantize, compiled once for this CPU (GGML_NATIVE: the build
    uses the instruction sets this machine has; ~15 min on 2 cores)."""
    bin_dir = home() / "build" / "bin"
    if built():
        return bin_dir
    tree, build, log = source(), home() / "build", home() / "build.log"
    print(f"building llama.cpp {VERSION} ({', '.join(TARGETS)}) in {build}; log: {log}", flush=True)
    flags = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF"]
    flags += ["-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_EXAMPLES=ON", "-DLLAMA_BUILD_SERVER=OFF"]
    _run(["cmake", "-S", tree, "-B", build, "-G", "Ninja", *flags], log)
    _run(["cmake", "--build", build, "--target", *TARGETS, "-j", os.cpu_count() or 1], log)
    return bin_dir


def _converter_env() -> dict:
    deps = home() / "pydeps"
    if not (deps / "sentencepiece").is_dir():
        _run([sys.executable, "-m", "pip", "install", "-q", "--target", deps, "sentencepiece"], home() / "build.log")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(source() / "gguf-py"), str(deps)])
    return env


def gguf(checkpoint: Path, sha256: str, fmt: str) -> Path:
    """`checkpoint` (a Hugging Face folder) as a GGUF file of `fmt`, converted once and kept by content hash."""
    if fmt not in FORMATS:
        raise SystemExit(f"unknown GGUF format {fmt!r}; known: {', '.join(FORMATS)}")
    out = home() / "gguf" / sha256[:16] / f"{fmt}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".part")
    log = home() / "convert.log"
    if FORMATS[fmt]:
        print(f"converting {checkpoint} to GGUF {fmt}", flush=True)
        script = source() / "convert_hf_to_gguf.py"
        cmd = [sys.executable, script, checkpoint, "--outtype", FORMATS[fmt], "--outfile", part]
        _run(cmd, log, env=_converter_env())
    else:
        print(f"quantizing GGUF F32 to {fmt}", flush=True)
        _run([tools() / "llama-quantize", gguf(checkpoint, sha256, "F32"), part, fmt], log)
    part.replace(out)
    return out


@dataclass(frozen=True)
class BenchRun:
    seconds: float
    """Wall time of prefill + decode as llama-batched-bench times it (model load excluded, as for every engine)."""
    prefill_seconds: float
    """Time of the batch's prompt decode, after which every sequence's first token is known: its TTFT."""
    output_tokens: int


@dataclass(frozen=True)
class Runner:
    """llama-batched-bench on one GGUF file with fixed threads; `repack=False` is llama.cpp's --no-repack (its
    AMX / repacked kernels off), chosen by `probe` when the repacked kernels fault on this machine."""

    model: Path
    threads: int
    repack: bool = True
    kernels: str = ""

    def command(self, batch: int, isl: int, decode: int) -> list[str]:
        cmd = [str(tools() / "llama-batched-bench"), "-m", str(self.model), "-t", str(self.threads)]
        context = -(-batch * (isl + decode + 1) // 256) * 256  # room for every sequence, in llama.cpp's 256 steps
        cmd += ["-tb", str(self.threads), "-c", str(context), "-b", "2048", "-ub", "512"]
        cmd += ["-npp", str(isl), "-ntg", str(decode), "-npl", str(batch), "--output-format", "jsonl"]
        return cmd + ([] if self.repack else ["--no-repack"])

    def run(self, batch: int, isl: int, osl: int) -> BenchRun:
        """`batch` sequences of `isl` random tokens each (own prompts, not shared), then `osl` output tokens each:
        the prompt decode gives the first, osl - 1 batched decode steps the rest (as in our engines' runs)."""
        done = subprocess.run(self.command(batch, isl, osl - 1), capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"llama-batched-bench exited {done.returncode}: {done.stderr[-2000:]}")
        rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        rows += [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
        if len(rows) != 1:
            raise RuntimeError(f"llama-batched-bench printed {len(rows)} result rows: {done.stdout[-2000:]}")
        row = rows[0]
        return BenchRun(row["t"], row["t_pp"], batch * osl)

    def probe(self) -> Runner:
        """A short run; where the repacked kernels die with SIGILL (seen on VMs that list AMX but do not allow it),
        the runner without them. Records which kernels it used: the CPU features the build dispatches on and the
        weight buffers the model was loaded into (CPU_REPACK / AMX buffers are the repacked or AMX kernels)."""
        for repack in (True, False):
            runner = Runner(self.model, self.threads, repack)
            done = subprocess.run([*runner.command(1, 8, 2), "-v"], capture_output=True, text=True, check=False)
            if done.returncode == -signal.SIGILL and repack:
                print(f"llama.cpp: repacked kernels fault here (SIGILL); using --no-repack for {self.model.name}")
                continue
            if done.returncode:
                raise RuntimeError(f"llama-batched-bench exited {done.returncode}: {done.stderr[-2000:]}")
            buffers = [ln.split("load_tensors:")[-1].strip() for ln in done.stderr.splitlines() if "model buffer" in ln]
            info = f"{cpu_features()}; weights in: {', '.join(buffers) or 'unknown'}"
            return Runner(self.model, self.threads, repack, info)
        raise AssertionError("unreachable")


FEATURES = ("avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx_int8", "llamafile")


def cpu_features() -> str:
    """The CPU features llama.cpp's build found and dispatches on (ggml_cpu_has_*, read from its library)."""
    import ctypes

    library = ctypes.CDLL(str(tools() / "libggml-cpu.so"))
    return " ".join(f"{name.upper()}={getattr(library, f'ggml_cpu_has_{name}')()}" for name in FEATURES)


def available() -> str | None:
    """Why llama.cpp cannot be built here, or None (also None when it was built before)."""
    if built():
        return None
    missing = [tool for tool in ("cmake", "ninja", "c++") if shutil.which(tool) is None]
    return f"llama.cpp needs {', '.join(missing)} to build" if missing else None
