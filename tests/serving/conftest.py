"""Serving tests: moepress outputs in vLLM (CPU, float32) give transformers' greedy tokens.

Skipped where vLLM is not installed. vLLM runs in this process (no engine subprocess) with a small KV cache:
a model then starts in about 3 s on 2 cores, against about 10-25 s for the first one (imports, and the
registry's one-off inspection of each new model class).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default reserves (and zeroes) far more


def _torchcodec_loads() -> bool:
    """vLLM imports torchcodec guarded against ImportError only; a CUDA build of it on a CPU machine raises OSError."""
    try:
        import torchcodec  # noqa: F401
    except ImportError:
        return True
    except OSError:
        return False
    return True


if not _torchcodec_loads():
    # a stand-in that raises ImportError, for this process and vLLM's helper subprocesses
    shim = Path(__file__).parent / "_no_torchcodec"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    sys.path.insert(0, str(shim))
    sys.modules.pop("torchcodec", None)

pytest.importorskip("vllm")
