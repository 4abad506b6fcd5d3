"""Builds the optional fused MaxSim kernel; everything else about the package is in pyproject.toml.

The kernel is a plain C file with AVX512-BF16 code behind a runtime CPU check. ``optional=True``: where no C
compiler is present the install still succeeds and metaembed scores with torch GEMMs instead.
"""

from __future__ import annotations

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "metaembed._fused_maxsim",
            sources=["src/metaembed/_fused_maxsim.c"],
            extra_compile_args=["-O3", "-std=c11"],
            optional=True,
        )
    ]
)
