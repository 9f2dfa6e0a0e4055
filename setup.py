"""greentask: a brokerless task-offload system on gevent."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


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
