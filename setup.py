"""Builds the optional C parts; everything else about the package is in pyproject.toml.

The fused MaxSim kernel is a plain C file with AVX512-BF16 / -VNNI code behind a runtime CPU check; the map guard
turns a SIGBUS from a segment file truncated under the index into an error the index reports. Both are
``optional=True``: where no C compiler is present the install still succeeds, metaembed scores with torch
GEMMs, and the index goes without the guard (docs/index.md says what that costs).
"""

from __future__ import annotations

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "metaembed._fused_maxsim",
            sources=["src/metaembed/_fused_maxsim.c"],
            # -fno-wrapv undoes Python's -fwrapv: with signed overflow defined, GCC keeps the tile loops' index
            # arithmetic general, and the kernel ran 10-40 % slower (measured one query at a time, thread CPU time)
            extra_compile_args=["-O3", "-std=c11", "-fno-wrapv"],
            optional=True,
        ),
        Extension(
            "metaembed._mapguard",
            sources=["src/metaembed/_mapguard.c"],
            extra_compile_args=["-O2", "-std=c11"],
            optional=True,
        ),
    ]
)
