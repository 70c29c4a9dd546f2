"""The deployment scenarios of ``tests/deployment.py``, timed (not a test; the test runs the same).

HAProxy in front of two ``stepaudio serve`` processes (tiny checkpoints), both on a pool of two
chat endpoints (``tests/openai_server.py`` processes serving the tiny Step-Audio-Chat over the
OpenAI API). Prints what each scenario saw and how long start-up and each scenario took.

    PYTHONPATH=. python bench/deployment.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from deployment import Deployment, run_scenarios  # noqa: E402

from stepaudio.tiny import ensure_tiny_models  # noqa: E402


async def main(folder: Path) -> dict:
    root = ensure_tiny_models(folder / "tiny")
    dep = Deployment(root, folder)
    t0 = time.perf_counter()
    try:
        await dep.start()
        started = time.perf_counter() - t0
        seen = await run_scenarios(dep)
    finally:
        dep.stop()
    seen["timings_s"] = {"start-up (4 processes + HAProxy)": started, **seen["timings_s"],
                         "total": time.perf_counter() - t0}
    return seen


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=Path, help="work folder to keep (logs, configs)")
    args = ap.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        out = asyncio.run(main(args.keep))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = asyncio.run(main(Path(tmp)))
    print(f"machine: {platform.node()} ({platform.machine()}), python {platform.python_version()}")
    for name, secs in out.pop("timings_s").items():
        print(f"{name:40s} {secs:6.1f} s")
    print(json.dumps(out, ensure_ascii=False, indent=1))
