"""Builds relay/_fastpath.pyx; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

setup(
    ext_modules=cythonize(
        [
            Extension(
                "relay._fastpath",
                ["relay/_fastpath.pyx"],
                define_macros=[("_GNU_SOURCE", None)],  # splice(), pipe2(), F_SETPIPE_SZ
            )
        ],
        # binding: Cython 3's default, spelled out for bookworm's cython3 (0.29): the functions then have
        # signatures (inspect.signature), as their pure-Python twins do.
        compiler_directives={"language_level": "3", "binding": True},
    ),
)
