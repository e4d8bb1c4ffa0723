"""The one compiled module: replay_bridge._blockscan (the checks' block scan).

It is optional: where it cannot be built (no C compiler), the install goes on and the checks
run their NumPy path, with the same results.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("replay_bridge._blockscan", ["replay_bridge/_blockscan.c"],
                             extra_compile_args=["-O3"], optional=True)])
