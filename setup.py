"""Install kale_ext, a PyKale plugin for lead-specific multimodal ECG learning (LS-EMVAE)."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
    name="kale_ext",
    version="0.1.0",
    description="Lead-specific multimodal ECG learning (LS-EMVAE) as a PyKale plugin",
    long_description=(HERE / "README.md").read_text(encoding="utf-8") if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["kale_ext", "kale_ext.*"]),
    install_requires=[
        # pykale 0.2.1 pins torch<=2.6.0; torchvision must match that torch.
        "torch>=2.1,<=2.6.0",
        "torchvision>=0.16,<=0.21.0",
        "pykale>=0.2.1",
        "pytorch-lightning>=2.3.2",
        "yacs>=0.1.8",
        "wfdb>=4.1",
        "scikit-learn>=1.3",
        "numpy>=1.24",
        "scipy>=1.11",
        "pandas>=2.0",
        "tqdm>=4.64",
        # TensorBoard logs of the pipeline (Lightning's TensorBoardLogger needs it).
        "tensorboard>=2.14",
    ],
    extras_require={
        # interpretation: integrated gradients and figures
        "interpret": ["captum>=0.7", "matplotlib>=3.7"],
        # tests and linting; onnx/onnxruntime check the fusion export
        "dev": ["pytest>=7.4", "ruff>=0.5", "onnx>=1.16", "onnxruntime>=1.17", "captum>=0.7", "matplotlib>=3.7"],
    },
)
