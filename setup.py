"""Builds mmrec_ops._C, the C++ operator library, with torch's extension tooling.

    python -m pip install --no-build-isolation -e .    # or: python setup.py build_ext --inplace

Torch must already be installed: the library is compiled against it (its
version is recorded in the library and reported by `python -m mmrec_ops.check`).
Set MMREC_NATIVE=1 to add -march=native for a build that only runs on this CPU.
"""

import os
import re
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

ROOT = Path(__file__).parent
VERSION = re.search(r'__version__ = "(.+)"', (ROOT / "mmrec_ops" / "_version.py").read_text()).group(1)


def compile_args():
    args = [
        "-O3",
        "-fopenmp",
        # Unquoted on purpose: ops.cpp stringifies them, which survives every
        # build backend's shell quoting.
        f"-DMMREC_TORCH_VERSION={torch.__version__}",
        f"-DMMREC_VERSION={VERSION}",
    ]
    if os.environ.get("MMREC_NATIVE") == "1":
        args.append("-march=native")
    return args


setup(
    ext_modules=[
        CppExtension(
            "mmrec_ops._C",
            sources=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "mmrec_ops" / "csrc").glob("*.cpp")),
            extra_compile_args={"cxx": compile_args()},
            extra_link_args=["-fopenmp"],
            py_limited_api=True,
        )
    ],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
