"""greentask: a brokerless task-offload system on gevent."""

import os
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

HERE = Path(__file__).parent
#: The modules every request runs through. Where mypyc is installed and a C
#: compiler works they are compiled (about a fifth fewer instructions per request:
#: docs/performance.md); elsewhere, or with GREENTASK_COMPILE=0, the same
#: source runs as Python.
HOT_PATH = ["greentask/protocol.py", "greentask/daemon/connection.py",
            "greentask/daemon/runner.py", "greentask/daemon/writer.py",
            "greentask/daemon/scoreboard.py"]


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def hot_path_extensions() -> list[Extension]:
    """The compiled hot path, or none (asked not to, or mypyc is not installed)."""
    if os.environ.get("GREENTASK_COMPILE", "1") == "0":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        return []
    return mypycify(["--ignore-missing-imports", "--follow-imports=silent", *HOT_PATH],
                    group_name="greentask.hot_path",
                    # Its C per Python version: CI builds two versions at once.
                    target_dir=f"build/mypyc-{sys.version_info[0]}.{sys.version_info[1]}")


class OptionalBuildExt(build_ext):
    """Build the compiled hot path if this machine can; if not, say so and go on."""

    def run(self) -> None:
        try:
            super().run()
        except (BaseError, CCompilerError, OSError) as exc:
            for path in self.get_outputs():  # a module without the rest would not import
                Path(path).unlink(missing_ok=True)
            print(f"greentask: the compiled hot path did not build ({exc}); the same "
                  "modules run as Python, with about a quarter more CPU per request. Install "
                  "a C compiler and Python's headers to compile them, or set "
                  "GREENTASK_COMPILE=0 to skip this", file=sys.stderr)


TEST_CORE = ["pytest>=8", "pytest-timeout>=2.3", "websocket-client>=1.7", "aiosmtpd>=1.4",
             "trustme>=1.1", "uvloop>=0.19"]

setup(
    name="greentask",
    version="0.1.0",
    description="Offload slow work to pre-forked gevent processes over TCP; no broker.",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["greentask", "greentask.*"]),
    package_data={"greentask": ["py.typed"],
                  "greentask.gateway": ["static/*.html", "static/*.svg", "static/uplot/*"]},
    install_requires=requirements(),
    ext_modules=hot_path_extensions(),
    cmdclass={"build_ext": OptionalBuildExt},
    extras_require={
        # What the daemon, client and gateway tests need (CI runs them on
        # every supported Python), and the whole suite's tools on top.
        "test-core": TEST_CORE,
        "test": [*TEST_CORE, "hypothesis>=6.100", "fastapi>=0.110", "uvicorn>=0.29",
                 "httpx>=0.27",
                 "ruff>=0.6", "selenium>=4.20", "dockerfile-parse>=2.0", "pyyaml>=6",
                 "py-spy>=0.3", "import-linter>=2.1"],
    },
    entry_points={"console_scripts": ["greentask = greentask.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Framework :: gevent",
        "Operating System :: POSIX :: Linux",
    ],
)
