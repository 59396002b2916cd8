"""The documented config path: `--config=configs/divita.py[:variants]`.

The config itself (every field, the variants, the launch commands) lives in
divita_jax/configs/divita.py, installed with the package; this file only
lets the command run from a checkout's root.
"""

from divita_jax.configs.divita import get_config  # noqa: F401
