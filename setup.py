"""kflow: flow matching along the K-amplitude (scale) of data."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="kflow",
    version="0.1.0",
    description="K-Flow: flow matching along the K-amplitude, for molecular assembly and latent image generation",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["kflow", "kflow.*"]),
    # The pretrained assembly models (kflow.molecular.pretrained.load_pretrained finds them by name) and the PEP 561
    # marker that tells type checkers kflow is typed.
    package_data={"kflow": ["py.typed"],
                  "kflow.molecular": ["pretrained_models/*.pt", "pretrained_models/README.md"]},
    include_package_data=True,
    install_requires=[
        # Any torch >= 2.1 works; `make install` pins the CPU build 2.13.0 first so pip never pulls CUDA wheels.
        "torch>=2.1",
        "torch-geometric>=2.4",
        "e3nn>=0.5.1",
        "numpy>=1.24",
        "scipy>=1.10",
        "tqdm>=4.60",
        "ase>=3.22",
        "pymatgen>=2023.0",
        "rdkit>=2023.3",
        "pyxtal>=1.0",
        "spglib>=2.0",  # space-group operations of the crystal search
        "oxtalign>=0.1",  # the field's packing metric (COMPACK-equivalent RMSD_15), Apache-2.0
        "ptwt>=1.0",
        "torchdiffeq>=0.2.3",
        "lmdb>=1.4",
        "packmol>=21",  # the PackMol binary (PyPI wheel ships it), for the classical baseline
        "matplotlib>=3.7",  # learning curves and cluster pictures
        "huggingface_hub>=0.20",
    ],
    extras_require={
        # torch-scatter is an optional accelerator (source-only on PyPI); kflow falls back to torch_geometric's scatter.
        "scatter": ["torch-scatter"],
        "vision": ["diffusers>=0.25", "matplotlib>=3.7", "scikit-learn>=1.3", "pillow>=9.0", "safetensors>=0.4"],
        "dev": [
            "pytest>=7.4",
            "diffusers>=0.25",
            "matplotlib>=3.7",
            "scikit-learn>=1.3",
            "pillow>=9.0",
            "safetensors>=0.4",
        ],
    },
    entry_points={"console_scripts": ["kflow = kflow.cli:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Chemistry",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
