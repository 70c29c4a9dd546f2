"""Run the real ``transformers serve`` CLI with our Step1 model class visible to it.

``transformers serve`` resolves a checkpoint's model class as ``getattr(transformers,
config.architectures[0])``; ``Step1ForCausalLM`` is not a transformers class (the published
checkpoints use remote code, which the tiny ones do not ship), so the server is started in a
process that registers Step1 first. Everything else is the unmodified transformers server.

Run: ``python tests/transformers_serve_step1.py MODEL_DIR --port P --host 127.0.0.1 --device cpu``
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import transformers  # noqa: E402
from transformers.cli.transformers import app  # noqa: E402

from stepaudio.llm import Step1ForCausalLM  # noqa: E402  (also registers the Auto classes)

transformers.Step1ForCausalLM = Step1ForCausalLM

if __name__ == "__main__":
    sys.argv = ["transformers", "serve", *sys.argv[1:]]
    app()
