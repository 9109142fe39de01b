"""The one compiled part: per-row xxh3 digests with the GIL released (common/_pagehash.c).

Built against xxhash.h (Debian: libxxhash-dev, which scripts/install.sh installs), inlined so
that no library is linked; on x86 a second copy of the loop is built for AVX2 and chosen at
import where the CPU has it. Optional: where it cannot be built, the package installs without it
and common/guest/pagehash.py hashes rows in Python (same digests, about twice the time).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "common._pagehash",
            ["common/_pagehash.c", "common/_pagehash_avx2.c"],
            define_macros=[("XXH_INLINE_ALL", "1")],
            extra_compile_args=["-O2"],
            optional=True,
        )
    ]
)
