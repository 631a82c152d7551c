"""Builds the optional native kernel of `mdu diff` (mdu_cli/diff/_diffkernel.c).

Everything else is declared in pyproject.toml. The extension is optional: where
no C compiler is available the install still succeeds and `mdu diff` runs
its numpy path, which gives the same report more slowly.
"""

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildExt(build_ext):
    def build_extensions(self):
        # -fopenmp-simd honours the reduction pragma (vectorised sums) without
        # linking an OpenMP runtime; MSVC ignores the pragma.
        flags = ["/O2"] if self.compiler.compiler_type == "msvc" else ["-O3", "-fopenmp-simd"]
        for extension in self.extensions:
            extension.extra_compile_args = flags
        super().build_extensions()


setup(
    ext_modules=[Extension("mdu_cli.diff._diffkernel", ["mdu_cli/diff/_diffkernel.c"], optional=True)],
    cmdclass={"build_ext": BuildExt},
)
