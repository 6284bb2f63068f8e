"""The JSON sidecar crn-export writes beside every artefact (``<artefact>.json``): the model config,
shapes or profile, dtype, versions and verification. Synthesis reads the model config from it (an
ONNX model, package or engine holds weights, not the classes), and a package's or engine's shapes."""
from __future__ import annotations

import json
from pathlib import Path

from crn_fast.errors import CRNError

# what crn-export writes, by file name: the backend that runs it, what it is, and the option that builds it
EXPORTED = {".onnx": ("onnxruntime", "an ONNX model", "--onnx"),
            ".pt2": ("aoti", "an AOTInductor package", "--compile"),
            ".engine": ("tensorrt", "a TensorRT engine", "--trt")}


def read_sidecar(path: str | Path) -> dict:
    """The sidecar of the artefact ``path``, or a CRNError naming it (missing, unreadable, or not
    crn-export's: no model config)."""
    side = Path(f"{path}.json")
    try:
        facts = json.loads(side.read_text(encoding="utf-8-sig"))  # a BOM from an editor too
    except (OSError, ValueError) as e:
        why = "missing" if isinstance(e, FileNotFoundError) else f"unreadable ({type(e).__name__}: {e})"
        raise CRNError(f"{side} (the sidecar crn-export writes beside {Path(path).name}) is {why}: it holds the "
                       f"model config and shapes that running {Path(path).name} needs") from None
    if not isinstance(facts, dict) or "model" not in facts:
        raise CRNError(f"{side} is not a crn-export sidecar (it has no model config)")
    return facts


def sidecar_config(path: str | Path, facts: dict | None = None):
    """The model config (CRNConfig) in the artefact's sidecar, or a CRNError naming the sidecar."""
    from crn_fast.config import CRNConfig
    facts = read_sidecar(path) if facts is None else facts
    try:
        return CRNConfig.from_dict(facts["model"])
    except (CRNError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise CRNError(f"{path}.json: its model config is invalid ({type(e).__name__}: {e})") from None
