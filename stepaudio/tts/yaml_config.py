"""Build the flow, HiFT and mel extractor from a real `cosyvoice.yaml`, without hyperpyyaml.

The yaml names reference classes (`!new:cosyvoice.flow.flow.MaskedDiffWithXvec`, …). Those paths
are mapped onto this package's re-implementations by an explicit table (`CLASS_TABLE`); nothing
is imported by name from the file, so a yaml cannot make us import or run arbitrary code. An
unknown tag or class path in what we build is a `ModelError` naming it and where it is.

Tags (hyperpyyaml semantics): `!new:X` constructs X (mapping → keyword args, list → positional);
`!name:X` is `functools.partial(X, **args)`; `!ref <key>` / `!copy <key>` refer to another key
(simple arithmetic like `!ref <a> * 2` is evaluated; other text is string-interpolated);
`!tuple` makes a tuple; `!apply:` is accepted only for the seed setters real CosyVoice yamls
start with, and ignored (they only seed training-time randomness).
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stepaudio.errors import ModelError
from stepaudio.models import YamlTag, load_hyperpyyaml_plain

#: Reference class / function path → "module:attribute" of our implementation.
CLASS_TABLE: dict[str, str] = {
    "cosyvoice.flow.flow.MaskedDiffWithXvec": "stepaudio.tts.flow:MaskedDiffWithXvec",
    "cosyvoice.flow.flow_matching.ConditionalCFM": "stepaudio.tts.flow:ConditionalCFM",
    "cosyvoice.flow.length_regulator.InterpolateRegulator": "stepaudio.tts.flow:InterpolateRegulator",
    "cosyvoice.flow.decoder.ConditionalDecoder": "stepaudio.tts.estimator:ConditionalDecoder",
    "cosyvoice.transformer.encoder.ConformerEncoder": "stepaudio.tts.conformer:ConformerEncoder",
    "cosyvoice.hifigan.generator.HiFTGenerator": "stepaudio.tts.hift:HiFTGenerator",
    "cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor": "stepaudio.tts.hift:ConvRNNF0Predictor",
    "cosyvoice.matcha.audio.mel_spectrogram": "stepaudio.tts.mel:mel_spectrogram",
    "omegaconf.DictConfig": "stepaudio.tts.yaml_config:dict_config",
}

#: `!apply:` targets that are recognised and skipped (global seeding for training).
IGNORED_APPLY = frozenset({
    "random.seed", "numpy.random.seed", "torch.manual_seed", "torch.cuda.manual_seed_all",
})

#: The top-level keys the token-to-wav path needs.
REQUIRED_KEYS = ("flow", "hift", "feat_extractor")

_MEL_KEYS = ("n_fft", "num_mels", "sampling_rate", "hop_size", "win_size", "fmin", "fmax")
_REF_TOKEN = re.compile(r"<([A-Za-z_][\w.\[\]]*)>")
_ARITH = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
          ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
          ast.Pow: operator.pow}


def dict_config(content: Mapping[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    """Stand-in for `omegaconf.DictConfig(content=…)`: a plain dict (our classes read mappings)."""
    return {**dict(content or {}), **kwargs}


@dataclass
class CosyVoiceConfig:
    """The built objects plus the numbers other stages need, all read from the yaml."""

    flow: Any
    hift: Any
    feat_extractor: Callable[..., Any]
    mel: dict[str, Any]
    raw: dict[str, Any] = field(repr=False)

    @property
    def sample_rate(self) -> int:
        """Output / prompt-mel sampling rate (the mel extractor's, which the flow is trained on)."""
        return int(self.mel["sampling_rate"])

    @property
    def input_frame_rate(self) -> float:
        return float(self.flow.input_frame_rate)


def load_cosyvoice_yaml(path: Path | str, keys: tuple[str, ...] = REQUIRED_KEYS) -> CosyVoiceConfig:
    """Parse `cosyvoice.yaml` and build `keys` (default: flow, hift, feat_extractor), unloaded."""
    path = Path(path)
    try:
        doc = load_hyperpyyaml_plain(path)
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err.strerror or err})") from None
    except Exception as err:  # PyYAML's errors carry line/column; keep them on one line
        raise ModelError(f"{path}: not valid yaml ({' '.join(str(err).split())})") from None
    if not isinstance(doc, dict):
        raise ModelError(f"{path}: expected a mapping at the top level")
    missing = [k for k in keys if k not in doc]
    if missing:
        raise ModelError(f"{path}: missing top-level key(s) {', '.join(missing)}")
    builder = _Builder(doc, str(path))
    for key, node in doc.items():  # seeds and other side-effect tags are checked, never run
        if isinstance(node, YamlTag) and node.tag.startswith("!apply:"):
            builder.build(node, key)
    feat = builder.build(doc["feat_extractor"], "feat_extractor") if "feat_extractor" in doc else None
    flow_node = doc.get("flow")
    flow_mel = flow_node.value.get("mel_feat_conf") if _is_new(flow_node) else None
    mel = _mel_settings(feat, builder.build(flow_mel, "flow.mel_feat_conf"), str(path))
    if _is_new(flow_node) and flow_mel is None:
        # The reference's flow falls back to its own default mel_feat_conf (22050 Hz / 256); use
        # the yaml's feature settings instead, which agree with it for every shipped checkpoint.
        flow_node = YamlTag(flow_node.tag, {**flow_node.value, "mel_feat_conf": mel})
    nodes = {**doc, "flow": flow_node} if flow_node is not None else doc
    built = {k: feat if k == "feat_extractor" else builder.build(nodes[k], k) for k in keys}
    return CosyVoiceConfig(built.get("flow"), built.get("hift"), built.get("feat_extractor"), mel, doc)


def _is_new(node: Any) -> bool:
    return isinstance(node, YamlTag) and node.tag.startswith("!new:") and isinstance(node.value, dict)


def _mel_settings(feat: Any, flow_mel: Any, where: str) -> dict[str, Any]:
    """Mel settings: the feat_extractor's keyword arguments, else the flow's `mel_feat_conf`."""
    feat_args = feat.keywords if isinstance(feat, functools.partial) else {}
    flow_args = flow_mel if isinstance(flow_mel, dict) else {}
    mel = {k: feat_args.get(k, flow_args.get(k)) for k in _MEL_KEYS}
    absent = [k for k in ("sampling_rate", "hop_size") if not isinstance(mel[k], int | float)]
    if absent:
        raise ModelError(f"{where}: feat_extractor has no numeric {', '.join(absent)}")
    return mel


class _Builder:
    def __init__(self, doc: dict[str, Any], where: str) -> None:
        self.doc = doc
        self.where = where

    def fail(self, at: str, msg: str) -> ModelError:
        return ModelError(f"{self.where}: {at}: {msg}")

    def build(self, node: Any, at: str) -> Any:
        if isinstance(node, dict):
            return {k: self.build(v, f"{at}.{k}") for k, v in node.items()}
        if isinstance(node, list):
            return [self.build(v, f"{at}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, YamlTag):
            return node
        kind, _, target = node.tag.partition(":")
        if kind in ("!ref", "!copy"):
            return self.build(copy.deepcopy(self.ref(node.value, at)), at)
        if kind == "!tuple":
            return tuple(self.build(node.value, at))
        if kind == "!apply":
            if target in IGNORED_APPLY:
                return None
            raise self.fail(at, f"!apply:{target} is not allowed (only seed setters are accepted)")
        if kind not in ("!new", "!name"):
            raise self.fail(at, f"unsupported yaml tag {node.tag!r}")
        fn = self.resolve(target, at)
        value = node.value
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        if isinstance(value, dict):
            kwargs = {k: self.build(v, f"{at}.{k}") for k, v in value.items()}
        elif isinstance(value, list):
            args = [self.build(v, f"{at}[{i}]") for i, v in enumerate(value)]
        elif value not in (None, ""):
            args = [self.build(value, at)]
        if kind == "!name":
            return functools.partial(fn, *args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except TypeError as err:
            raise self.fail(at, f"{target}: {err}") from None

    def resolve(self, target: str, at: str) -> Callable[..., Any]:
        ours = CLASS_TABLE.get(target)
        if ours is None:
            raise self.fail(at, f"unknown class path {target!r} (known: {', '.join(sorted(CLASS_TABLE))})")
        module, _, attr = ours.partition(":")
        return getattr(importlib.import_module(module), attr)

    def ref(self, text: Any, at: str) -> Any:
        """`<key>` → that node; an expression of refs → evaluated arithmetic or interpolated text."""
        if not isinstance(text, str):
            raise self.fail(at, f"!ref needs '<key>', got {text!r}")
        whole = _REF_TOKEN.fullmatch(text.strip())
        if whole:
            return self.lookup(whole.group(1), at)

        def sub(m: re.Match[str]) -> str:
            v = self.build(self.lookup(m.group(1), at), at)
            return repr(v) if isinstance(v, int | float) else str(v)

        expr = _REF_TOKEN.sub(sub, text)
        try:
            return _eval_arith(ast.parse(expr, mode="eval").body)
        except (SyntaxError, ValueError):
            return expr

    def lookup(self, dotted: str, at: str) -> Any:
        cur: Any = self.doc
        for part in (p for p in re.split(r"[.\[\]]+", dotted) if p):
            if isinstance(cur, YamlTag):
                cur = cur.value
            if isinstance(cur, dict) and part in cur:
                cur = cur[part]
            elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
                cur = cur[int(part)]
            else:
                raise self.fail(at, f"!ref <{dotted}> does not name a key")
        return cur


def _eval_arith(node: ast.AST) -> Any:
    """Numbers and + - * / // % ** only; anything else is not arithmetic (ValueError)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _eval_arith(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
        return _ARITH[type(node.op)](_eval_arith(node.left), _eval_arith(node.right))
    raise ValueError("not arithmetic")
