"""Test-only probe: the A1111 tier's fault injection and progress counter (``POST /multilora-probe/fail-at``,
``GET /multilora-probe/progress``), which touch only the script API and ``p.multilora_observer`` and so run on Forge
as they are. Loaded from that tier's file, not copied; Forge registers the script class found in this module."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SHARED = Path(__file__).resolve().parents[3] / "webui" / "probe_extension" / "scripts" / "multilora_faults.py"

_spec = importlib.util.spec_from_file_location("multilora_faults_shared", SHARED)
assert _spec is not None and _spec.loader is not None, SHARED
_shared = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_shared)

MultiLoraFaultProbe = _shared.MultiLoraFaultProbe
