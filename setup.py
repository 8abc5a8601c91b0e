"""Packaging for toolrl_jax: `pip install -e .` (add `[test]` for the parity/test extras)."""
from pathlib import Path

from setuptools import find_packages, setup


def _read_requirements(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


setup(
    name="toolrl_jax",
    version="0.1.0",
    description="Pure-JAX reinforcement learning for tool-using LLMs (ToolRL reproduction and beyond).",
    python_requires=">=3.10",
    packages=find_packages(include=["toolrl_jax", "toolrl_jax.*", "experiments", "experiments.*", "data", "data.*"]),
    install_requires=_read_requirements("requirements.txt"),
    extras_require={"test": _read_requirements("requirements-test.txt")},
    package_data={"toolrl_jax.evaluation": ["templates/*"]},
    include_package_data=True,
)
