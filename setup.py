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
        compiler_directives={"language_level": "3"},
    ),
)
