"""The per-head thresholds file: schema, validation, load/save and tensor-parallel slicing.

A thresholds file is written by the calibration tool and read once per process by the backend
(and once by the front end, which checks it before the engine starts). Each load reads the file's
bytes once, parses the tensors and metadata from those bytes and hashes the same bytes
(``Thresholds.sha256``), so the digest always describes the thresholds in use, even when the
file is replaced while a server starts. Format (see docs/DESIGN.md, "Thresholds file"):

- safetensors (never pickle: a ``.pt`` file is refused);
- fp32 tensors ``simthreshd1``, ``cdfthreshd``, ``pvthreshd`` and uint8 ``is_sparse``, each of shape
  ``[num_layers, num_heads]`` in *global* (un-sharded) layer and query-head order;
- optional fp32 tensors ``l1_budget`` and ``pv_l1_budget`` of shape ``[num_layers]``: the error
  budgets each layer was calibrated with (both or neither; files written before they existed have
  neither and still load, with ``Thresholds.l1_budget`` / ``pv_l1_budget`` = ``None``);
- string metadata: ``format`` = "sparge-thresholds", ``format_version`` = "1", the model geometry
  (``num_layers``, ``num_heads``, ``num_kv_heads``, ``head_dim``, ``blkq``, ``blkk``) and provenance
  (``model``, ``config_hash``, ``l1``, ``pv_l1``, ``sim_rule``, ``allocation`` (``model``: the
  budgets bound the heads' mean error; ``head``: every head's; empty in older files),
  ``num_prompts``, ``prompts_sha256``, ``package_version``, ``created``). The numeric ones are validated like the tensors: ``l1`` and
  ``pv_l1`` empty or a number in (0, 1] (``pv_l1 > l1`` when both are given), ``num_prompts`` an
  integer >= 0, the geometry positive integers.

Example::

    th = Thresholds.defaults(num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128)
    save_thresholds("llama.safetensors", th)
    th = load_thresholds("llama.safetensors", expect=ModelGeometry(32, 32, 8, 128))
    local = th.for_rank(tp_rank=1, tp_size=2)          # heads 16..31, 4 KV heads

Every problem with a file raises :class:`ThresholdsError` whose message names the file, the problem
and how to fix it. The package imports neither vLLM nor the kernels, only their geometry constants
(``sparge_serve.kernels.geometry``: no torch, no Triton), so the calibration tool and the
front-end check use it: ``schema`` holds the constants, :class:`Thresholds` and its validation,
the model geometry and the config digest; ``io`` reads and writes the files.
"""

from sparge_serve.thresholds.io import load_thresholds, save_thresholds
from sparge_serve.thresholds.schema import (
    BUDGET_TENSORS,
    DEFAULT_CDFTHRESHD,
    DEFAULT_SIMTHRESHD1,
    FORMAT,
    FORMAT_VERSION,
    TENSOR_NAMES,
    THRESHOLD_TENSORS,
    ModelGeometry,
    Thresholds,
    ThresholdsError,
    check_geometry,
    config_hash,
    model_geometry_of,
)

__all__ = [
    "BUDGET_TENSORS",
    "DEFAULT_CDFTHRESHD",
    "DEFAULT_SIMTHRESHD1",
    "FORMAT",
    "FORMAT_VERSION",
    "TENSOR_NAMES",
    "THRESHOLD_TENSORS",
    "ModelGeometry",
    "Thresholds",
    "ThresholdsError",
    "check_geometry",
    "config_hash",
    "load_thresholds",
    "model_geometry_of",
    "save_thresholds",
]
