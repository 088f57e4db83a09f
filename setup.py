"""Builds pconv_cuda._C: the CPU kernels always; the CUDA sources when a CUDA toolkit and a CUDA build of torch
are present (no GPU needed). FORCE_CUDA=1 / FORCE_CUDA=0 override; TORCH_CUDA_ARCH_LIST overrides the arch list.
PCONV_BUILD_EMU=1 also builds pconv_cuda._emu, the CUDA kernels under the SIMT emulation (test tooling, CPU only).
The cudnn_fused CUDA route needs cudnn-frontend's headers (cudnn_frontend_config); without them the build goes on
without the route and says so.
On Linux each built module must need libstdc++.so when torch does (a static libstdc++ crashes the process on the
first formatted error message); PCONV_ALLOW_STATIC_LIBSTDCXX=1 makes that check a warning.
"""
import glob
import os
import sys

# torch looks for the toolkit when cpp_extension is imported; without this it can pick /usr/local and fail to link.
if "CUDA_HOME" not in os.environ and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import find_packages, setup  # noqa: E402
from setuptools.errors import LinkError  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# tools/ holds build-time helpers that are not part of the package.
sys.path.insert(0, os.path.join(ROOT, "tools"))
from elf_needed import ALLOW_ENV, check_dynamic_libstdcxx  # noqa: E402

# Every arch nvcc 13 can build (it rejects anything older than sm_75), plus PTX for newer GPUs.
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0;10.0;12.0+PTX"


def cuda_decision():
    force = os.environ.get("FORCE_CUDA")
    toolkit = cpp_extension.CUDA_HOME
    has_nvcc = toolkit is not None and os.path.exists(os.path.join(toolkit, "bin", "nvcc"))
    if force == "0":
        return False, "FORCE_CUDA=0"
    if force == "1":
        if not has_nvcc or torch.version.cuda is None:
            sys.exit(f"pconv_cuda: FORCE_CUDA=1 but no usable CUDA toolkit (CUDA_HOME={toolkit}) or torch "
                     f"{torch.__version__} is not a CUDA build")
        return True, "FORCE_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not has_nvcc:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    return True, f"CUDA toolkit at {toolkit} and torch built for CUDA {torch.version.cuda}"


def _first_dir(candidates, needed):
    """The first existing directory among `candidates` that holds the file `needed`, else None."""
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, needed)):
            return d
    return None


def _package_dir(distribution, *parts):
    """A directory inside an installed pip distribution (e.g. the headers a wheel ships), or None."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution as dist
        return str(dist(distribution).locate_file(os.path.join(*parts)))
    except (ImportError, PackageNotFoundError):
        return None


def _frontend_version(include_dir):
    """CUDNN_FRONTEND_VERSION (major * 10000 + minor * 100 + patch) from the headers, 0 if unreadable."""
    import re
    try:
        with open(os.path.join(include_dir, "cudnn_frontend_version.h")) as f:
            text = f.read()
        major, minor, patch = (int(re.search(rf"CUDNN_FRONTEND_{n}_VERSION\s+(\d+)", text).group(1))
                               for n in ("MAJOR", "MINOR", "PATCH"))
        return major * 10000 + minor * 100 + patch
    except (OSError, AttributeError):
        return 0


def cudnn_frontend_config():
    """(include dirs, link args, message) for the cudnn_fused route, or (None, None, why not).

    The route needs cudnn-frontend's headers (CUDNN_FRONTEND_INCLUDE, else the nvidia-cudnn-frontend wheel), cudnn.h
    (CUDNN_INCLUDE_DIR, else the nvidia-cudnn wheel torch depends on, else the CUDA toolkit or /usr/include) and
    libcudnn to link (CUDNN_LIB_DIR, else the same places; torch has loaded it by the time _C is). PCONV_CUDNN_FUSED=0
    builds without the route."""
    if os.environ.get("PCONV_CUDNN_FUSED") == "0":
        return None, None, "PCONV_CUDNN_FUSED=0"
    fe_dir = _first_dir([os.environ.get("CUDNN_FRONTEND_INCLUDE"), _package_dir("nvidia-cudnn-frontend", "include")],
                        "cudnn_frontend.h")
    if fe_dir is None:
        return None, None, ("cudnn-frontend headers not found (pip install 'nvidia-cudnn-frontend>=1.16,<1.19', or "
                            "set CUDNN_FRONTEND_INCLUDE)")
    version = _frontend_version(fe_dir)
    if not (10600 <= version < 11900):
        # From 1.19 the headers include nvrtc.h and call NVRTC (an engine compiled at run time), which a
        # toolkit without NVRTC's headers cannot build; before 1.16 the graph API lacks what the route uses.
        return None, None, (f"cudnn-frontend {version // 10000}.{version // 100 % 100} at {fe_dir} is outside the "
                            "supported range >=1.16,<1.19")
    wheel_cudnn = None
    try:
        import nvidia.cudnn  # the wheel torch's CUDA build depends on
        wheel_cudnn = list(nvidia.cudnn.__path__)[0]
    except (ImportError, IndexError):
        pass
    toolkit = cpp_extension.CUDA_HOME or ""
    inc = _first_dir([os.environ.get("CUDNN_INCLUDE_DIR"), wheel_cudnn and os.path.join(wheel_cudnn, "include"),
                      os.path.join(toolkit, "include"), "/usr/include", "/usr/include/x86_64-linux-gnu"], "cudnn.h")
    if inc is None:
        return None, None, "cudnn.h not found (set CUDNN_INCLUDE_DIR)"
    lib_dirs = [os.environ.get("CUDNN_LIB_DIR"), wheel_cudnn and os.path.join(wheel_cudnn, "lib"),
                os.path.join(toolkit, "lib64"), "/usr/lib/x86_64-linux-gnu", "/usr/lib64"]
    for name in ("libcudnn.so", "libcudnn.so.9"):
        lib = _first_dir(lib_dirs, name)
        if lib is not None:
            found = f"cudnn-frontend {version // 10000}.{version // 100 % 100} at {fe_dir}, cudnn.h at {inc}"
            return [fe_dir, inc], [f"-L{lib}", f"-l:{name}"], found
    return None, None, "libcudnn not found (set CUDNN_LIB_DIR)"


def write_build_info(with_cuda, archs):
    # Read by pconv_cuda/__init__.py to explain a torch mismatch instead of failing on an undefined symbol.
    with open(os.path.join(ROOT, "pconv_cuda", "_build_info.py"), "w") as f:
        f.write("# Generated by setup.py; not under version control.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs!r}\n")


def extensions():
    with_cuda, why = cuda_decision()
    common = sorted(glob.glob("csrc/common/*.cpp"))
    sources = ["csrc/library.cpp"] + common + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ uses C++20 (templated lambdas, std::type_identity_t, std::atomic_ref): said explicitly, since older
    # torch.utils.cpp_extension versions pass -std=c++17.
    # -fno-trapping-math: nothing here relies on floating-point exceptions, and without it GCC keeps the hole
    # select X*M (maths.h, masked) as a branch instead of vectorising it.
    # -ffp-contract=off: GCC fuses a*b+c into one FMA wherever the ISA has it (the CPU loops' AVX2 form does,
    # cpu_backend.cpp, parallel_loop), even in ISO mode; off, every CPU (and the emulation) rounds the same way.
    cxx = ["-O3", "-std=c++20", "-fno-trapping-math", "-ffp-contract=off", "-Wall", "-Wextra",
           "-Wno-unused-parameter"]
    archs = ""
    if with_cuda:
        archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
        print(f"pconv_cuda: building CPU + CUDA kernels ({why}); archs {archs}", flush=True)
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + ["csrc/cuda/cudnn_fused.cpp"]
        fe_include, fe_link, fe_why = cudnn_frontend_config()
        if fe_include is None:
            print(f"pconv_cuda: building WITHOUT the cudnn_fused route: {fe_why}", flush=True)
        else:
            print(f"pconv_cuda: building the cudnn_fused route ({fe_why})", flush=True)
        ext = cpp_extension.CUDAExtension(
            "pconv_cuda._C", sources,
            define_macros=[("PCONV_WITH_CUDA", "1"), ("PCONV_WITH_CUDNN_FRONTEND", "0" if fe_include is None else "1"),
                           ("CUDNN_FRONTEND_SKIP_JSON_LIB", None)],
            extra_link_args=fe_link or [],
            # -isystem: the frontend's headers are not ours to keep free of warnings.
            extra_compile_args={"cxx": cxx + [f for d in fe_include or [] for f in ("-isystem", d)],
                                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"]},
        )
    else:
        print(f"pconv_cuda: building CPU kernels only ({why})", flush=True)
        ext = cpp_extension.CppExtension("pconv_cuda._C", sources, extra_compile_args=cxx)
    write_build_info(with_cuda, archs)
    if os.environ.get("PCONV_BUILD_EMU") != "1":
        return [ext]
    # The CUDA kernels under the SIMT emulation, on the CPU: test tooling, so CI runs them without a GPU.
    print("pconv_cuda: also building the SIMT emulation (PCONV_BUILD_EMU=1)", flush=True)
    emu = cpp_extension.CppExtension("pconv_cuda._emu", ["csrc/cuda/emu/emu_backend.cpp"] + common,
                                     extra_compile_args=cxx)
    return [ext, emu]


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, then a check of each built module: on Linux it must need libstdc++.so when torch does.
    A compiler that links libstdc++ statically gives the module its own C++ runtime next to torch's, and the first
    error message that formats a number crashes the process (tools/elf_needed.py)."""

    def build_extensions(self):
        super().build_extensions()
        if not sys.platform.startswith("linux"):
            return
        libc10 = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
        for ext in self.extensions:
            path = self.get_ext_fullpath(ext.name)
            try:
                problem = check_dynamic_libstdcxx(path, libc10, self.cxx_compiler())
            except (OSError, ValueError) as e:
                print(f"pconv_cuda: WARNING: libstdc++ check skipped, {path} unreadable ({e})", file=sys.stderr,
                      flush=True)
                continue
            if problem is None:
                continue
            if os.environ.get(ALLOW_ENV) == "1":
                print(f"pconv_cuda: WARNING ({ALLOW_ENV}=1): {problem}", file=sys.stderr, flush=True)
                continue
            os.remove(path)  # a module that crashes the process must not be left where it could be installed
            raise LinkError(f"{problem} (Removed {path}.)")

    def cxx_compiler(self):
        """The compiler the extensions were linked with, for the error message: $CXX, else setuptools' own."""
        if os.environ.get("CXX"):
            return os.environ["CXX"]
        for attr in ("linker_so_cxx", "compiler_cxx", "linker_so", "compiler_so"):
            command = getattr(self.compiler, attr, None)
            if command:
                return command[0]
        return "(unknown)"


# Pin the runtime torch to the one the extension is compiled against: the C++ ABI is not stable across releases.
TORCH_PIN = f"torch=={torch.__version__.split('+')[0]}"

setup(
    packages=find_packages(include=["pconv_cuda", "pconv_cuda.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    install_requires=[TORCH_PIN, "numpy"],
)
