import os

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))
version: dict = {}
with open(os.path.join(here, "dxtrack", "_version.py")) as f:
    exec(f.read(), version)
with open(os.path.join(here, "README.md"), encoding="utf-8") as f:
    long_description = f.read()

setup(
    name="dxtrack",
    version=version["__version__"],
    description="Metrics and errors from Python jobs to Amazon Data Firehose, fast and fork-safe",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dxtrack", "dxtrack.*"]),
    package_data={"dxtrack": ["py.typed"]},
    python_requires=">=3.9",
    entry_points={"console_scripts": ["dxtrack=dxtrack.cli:main"]},
    install_requires=[
        "boto3>=1.26",
        "orjson>=3.8",
        "cachetools>=5.0",
    ],
    extras_require={
        # The embedded Firehose and S3 that `make demo` runs against.
        "demo": ["moto[server]>=5.0"],
        # `dxtrack query`, `show` and `report`: SQL over landed records.
        "query": ["duckdb>=1.1"],
        # `dxtrack report --html`: the charts, drawn as inline SVG.
        "report": ["duckdb>=1.1", "matplotlib>=3.6"],
        "test": [
            "duckdb>=1.1",
            "matplotlib>=3.6",
            "pytest>=7",
            "pytest-xdist>=3.0",  # `make test` runs the suite in two processes
            "moto[server]>=5.0",
            "hypothesis>=6",
            "cfn-lint>=1.0",  # checks the template of `dxtrack setup --template`
        ],
        "dev": [
            "mypy>=1.5",
            "ruff>=0.4",
            "boto3-stubs[firehose]",
            "types-cachetools",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Typing :: Typed",
    ],
)
