from setuptools import find_packages, setup

setup(
    name="subtrack-pretrain",
    version="0.1.0",
    description="Distributed Llama pre-training on C4 with the SubTrack++ low-rank optimizer",
    # every package under models/, data/, optim/, pretrain/ (a list by hand missed optim.sharding and
    # pretrain.strategies, so a wheel install could not import them)
    packages=find_packages(include=["models*", "data*", "optim*", "pretrain*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "bitsandbytes>=0.46",
        "sentencepiece>=0.2",
        "datasets>=3.0",
        "tensorboard>=2.15",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "safetensors>=0.4",
    ],
    extras_require={
        # galore-torch and fira are the published references our presets are tested against.
        "test": ["pytest>=8", "transformers>=4.45", "galore-torch==1.0", "fira==1.0.2"],
        # the convergence benchmark's plots, and APOLLO / APOLLO-Mini through apollo-torch
        # (python -m pretrain.bench convergence); it runs without them
        "bench": ["matplotlib>=3.5", "apollo-torch==1.0.3"],
    },
    entry_points={"console_scripts": ["pretrain=pretrain.__main__:main"]},
)
