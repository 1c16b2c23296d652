from setuptools import setup

setup(
    name="vitprune",
    version="0.1.0",
    description="Structured lottery tickets for Vision Transformers: Refill and RSST, with Triton kernels",
    python_requires=">=3.10",
    # The top-level kernels/ folder is installed as vitprune.kernels, so the package never
    # claims the generic top-level name `kernels`.
    packages=["vitprune", "vitprune.bench", "vitprune.data", "vitprune.report", "vitprune.kernels"],
    package_dir={"vitprune": "vitprune", "vitprune.kernels": "kernels"},
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "timm>=1.0",
        "huggingface_hub",  # export --push, load_exported("hf-hub:..."), the card's Hub header
        "fire>=0.5",
        "wandb>=0.16",
        "numpy",
        "pyyaml",
        "safetensors",
        "matplotlib",
        "scipy",
        "triton; platform_system == 'Linux'",
    ],
    # dev: the tests, incl. W&B's own sweep engine (`sweeps`) that validates sweeps/*.yaml. The
    # tests run the kernels in Triton's interpreter, which fails with numpy >= 2.4 before
    # triton 3.7 (triton-lang/triton#9171).
    # deploy: `vitprune export` also writes model.onnx (torch.onnx's exporter needs onnx and
    # onnxscript) and `bench export` times it in ONNX Runtime; dev has it so the tests cover it.
    extras_require={"dev": ["pytest>=7", "wandb-workspaces", "sweeps", "triton>=3.7; platform_system == 'Linux'",
                            "onnx", "onnxscript", "onnxruntime"],
                    "deploy": ["onnx", "onnxscript", "onnxruntime"],
                    "report": ["wandb-workspaces"]},
)
