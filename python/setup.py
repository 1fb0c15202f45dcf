"""Builds libafm (afm.h's implementation as a shared library) into the package while it is built,
so `pip install ./python` needs only a C compiler - the same one `make lib` uses. The header is
found next to this folder (the repository's afm.h) or at $AFM_H."""
import os
import subprocess
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

HERE = os.path.dirname(os.path.abspath(__file__))


class build_with_lib(build_py):
    def run(self):
        super().run()
        header = os.environ.get("AFM_H", os.path.join(HERE, "..", "afm.h"))
        if not os.path.exists(header):
            sys.exit("afm: cannot find afm.h (set AFM_H=/path/to/afm.h)")
        out_dir = os.path.join(self.build_lib, "afm")
        os.makedirs(out_dir, exist_ok=True)
        name = "libafm.dylib" if sys.platform == "darwin" else "libafm.so"
        cc = os.environ.get("CC", "cc")
        cmd = [cc, "-std=c99", "-O2", "-shared", "-fPIC", "-DAFM_IMPLEMENTATION", "-x", "c", header,
               "-o", os.path.join(out_dir, name), "-lm", "-lpthread"]
        print(" ".join(cmd))
        subprocess.check_call(cmd)


class binary_distribution(Distribution):
    def has_ext_modules(self):  # the wheel carries a native library: tag it for this platform
        return True


setup(cmdclass={"build_py": build_with_lib}, distclass=binary_distribution)
