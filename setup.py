"""onestory_jax: OneStory (arXiv 2512.07802) next-shot video generation in JAX/Flax."""

import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements():
  lines = (_HERE / "requirements.txt").read_text().splitlines()
  return [l.strip() for l in lines if l.strip() and not l.startswith("#")]


setuptools.setup(
    name="onestory_jax",
    version="0.1.0",
    description="OneStory: coherent multi-shot video generation with adaptive memory, in JAX/Flax.",
    long_description=(_HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["onestory_jax", "onestory_jax.*"]),
    package_data={"onestory_jax": ["assets/*", "assets/**/*"]},
    install_requires=_requirements(),
    extras_require={
        # The reference PyTorch stack (CPU) for the numerical-parity tests of the Wan ports, torch pinned to the CPU
        # wheel that this platform provides; and the formatter that .ci/run checks (pyink, see pyproject.toml).
        "test": [
            "pytest==9.2.0",
            "pytest-xdist==3.8.0",
            "torch==2.13.0",
            "diffusers==0.42.1",
            "transformers==5.23.0",
            "pyink==26.5.1",
            # The studio's browser test (tests/test_studio.py) drives Debian's Chromium (/usr/bin/chromium).
            "playwright==1.65.3",
        ],
        # The local web app (python -m onestory_jax.studio, docs/studio.md).
        "studio": ["gradio==6.31.0"],
        "tpu": ["jax[tpu]==0.10.2"],
        "gpu": ["jax[cuda]==0.10.2"],
    },
)
