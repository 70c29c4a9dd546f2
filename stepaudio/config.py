"""Configuration: YAML files validated by pydantic.

One model holds every option with its default and meaning, so the docs can be generated from it and a
typo in a deployment's YAML is caught at start-up with one line naming the key.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from .errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "default.yaml"


def _yaml_switch(value: Any) -> Any:
    """YAML 1.1 reads an unquoted ``on`` / ``off`` as a boolean: take it as the word meant."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return value


#: auto / on / off, also when written unquoted in YAML.
Switch = Annotated[Literal["auto", "on", "off"], BeforeValidator(_yaml_switch)]
#: on / off, also when written unquoted in YAML.
OnOff = Annotated[Literal["on", "off"], BeforeValidator(_yaml_switch)]


def endpoint_urls(value: str | Sequence[str]) -> list[str]:
    """API roots from a config value: one URL, a list, or URLs separated by commas or spaces."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    urls = [u.strip().rstrip("/") for u in items if u.strip()]
    if not urls:
        raise ValueError("no endpoint URL given")
    for u in urls:
        parts = urlsplit(u)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{u!r} is not an http(s) URL")
    if len(set(urls)) != len(urls):
        raise ValueError(f"an endpoint is listed twice: {', '.join(urls)}")
    return urls


def _check_endpoints(value: str | list[str]) -> str | list[str]:
    endpoint_urls(value)  # raises ValueError with the reason
    return value


#: One API root, or several (a YAML list, or URLs separated by commas): a pool of replicas.
EndpointList = Annotated[str | list[str], AfterValidator(_check_endpoints)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelsConfig(_Section):
    profile: Literal["tiny", "real", "random"] = Field(
        "tiny",
        description="tiny: random-weight checkpoints generated on first use (babble, for development "
        "and CI); real: the published checkpoints under `root`; random: the speech models "
        "(TTS-3B, flow, HiFT) at their published shapes with seeded random weights built in "
        "memory on `tts.device`, no files (capacity measurements on a GPU: the voices are noise; "
        "the audio tokenizer is a zero-cost stand-in and the chat model must be `llm.engine: "
        "stand-in`).",
    )
    sizes: Literal["published", "small"] = Field(
        "published",
        description="random profile: the models' shapes; small: CPU-sized, for tests.",
    )
    root: Path | None = Field(
        None,
        description="Folder holding Step-Audio-Tokenizer/, Step-Audio-Chat/ and Step-Audio-TTS-3B/. "
        "For the tiny profile it defaults to <cache_dir>/tiny-models.",
    )
    cache_dir: Path | None = Field(
        None, description="Cache folder; default $STEPAUDIO_CACHE or ~/.cache/stepaudio."
    )
    seed: int = Field(0, description="Seed of the tiny checkpoints or the random profile's weights.")

    def resolved_cache_dir(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir.expanduser()
        env = os.environ.get("STEPAUDIO_CACHE")
        if env:
            return Path(env).expanduser()
        return Path.home() / ".cache" / "stepaudio"

    def resolved_root(self) -> Path:
        if self.root is not None:
            return self.root.expanduser()
        if self.profile == "real":
            raise ConfigError("models.root: required when models.profile is 'real'")
        if self.profile == "random":
            raise ConfigError("models.root: the random profile has no model files")
        return self.resolved_cache_dir() / f"tiny-models-seed{self.seed}"


class TokenizerConfig(_Section):
    device: str = Field("cpu", description="Torch device of the paraformer encoder.")
    onnx_providers: list[str] = Field(
        default_factory=lambda: ["CPUExecutionProvider"],
        description="onnxruntime providers for the S3 tokenizer, in order of preference.",
    )
    stream_idle_timeout_s: float = Field(
        300.0, gt=0, description="A streaming session untouched this long is evicted."
    )
    semantic_step_ms: int = Field(
        480,
        ge=120,
        multiple_of=120,
        description="Provisional streaming ids only (not the final codes, which the server "
        "uses): run the S3 tokenizer each time this much new audio has arrived.",
    )
    semantic_context_ms: int = Field(
        2400,
        ge=0,
        multiple_of=120,
        description="Provisional streaming ids only: left context fed to the S3 tokenizer with "
        "each new segment.",
    )
    semantic_lookahead_ms: int = Field(
        120,
        ge=0,
        multiple_of=120,
        description="Provisional streaming ids only: newest audio held back until more arrives "
        "(its codes see the future as offline ones do); flushed by finish().",
    )


class LLMConfig(_Section):
    """Step-Audio-Chat: which engine runs it, where, and how replies are sampled."""

    engine: Literal["transformers", "vllm", "openai", "stand-in"] = Field(
        "transformers",
        description="transformers: in this process on `device` (tiny models, one GPU); vllm: "
        "in-process vLLM AsyncLLM (pip install 'stepaudio-realtime[vllm]'); openai: a remote "
        "`vllm serve` (see `stepaudio vllm-command`) through its /v1/completions stream; "
        "stand-in: no model, canned replies with the 130B model's timing (`standin_*`), for "
        "measuring the speech side on one GPU; never for users.",
    )
    standin_prefill_ms_per_1k: float = Field(
        145.0, ge=0,
        description="stand-in engine: time to the first token per 1000 prompt tokens (one "
        "tensor-parallel rank of the 130B on an H200: 142 ms for 1000).",
    )
    standin_ms_per_token: float = Field(
        26.0, ge=0,
        description="stand-in engine: time between tokens (H200 rank: 23.4-26.6 ms at batch "
        "1-32, plus ~1 ms of all-reduce, estimated).",
    )
    device: str = Field("cpu", description="transformers engine: torch device (cpu, cuda:0).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "float32",
        description="transformers engine: weight dtype; auto keeps the checkpoint's (bfloat16). "
        "fp32 on CPU, bf16 on GPU.",
    )
    base_url: EndpointList = Field(
        "http://127.0.0.1:8000/v1",
        description="openai engine: the server's OpenAI API root (the part before /completions); "
        "a list (or URLs separated by commas) is a pool of replicas: each conversation sticks to "
        "one (a hash of the session id, so that replica's prefix cache holds its history), an "
        "endpoint that fails is taken out until its health check passes again.",
    )
    health_path: str = Field(
        "/health",
        description="openai engine, several endpoints: path probed on each endpoint's host "
        "(vLLM's /health; `/v1/models` for servers without one); 2xx is healthy.",
    )
    health_check_interval_s: float = Field(
        2.0, gt=0, le=300,
        description="openai engine, several endpoints: seconds between health checks (of the "
        "chat and the TTS pool).",
    )
    served_model_name: str = Field(
        "step-audio-chat",
        description="openai engine: the `model` sent with each request (vllm --served-model-name).",
    )
    api_key_env: str | None = Field(
        None,
        description="openai engine: name of the environment variable holding the API key "
        "(vllm --api-key); none sends no Authorization header. The key itself never goes in YAML.",
    )
    dialect: Literal["vllm", "openai"] = Field(
        "vllm",
        description="openai engine: vllm sends vLLM's extra fields (stop_token_ids, top_k, "
        "skip_special_tokens, return_token_ids); openai sends only standard OpenAI fields and "
        "relies on the server stopping on the checkpoint's eos (id 3).",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="openai engine: seconds to open a connection."
    )
    read_timeout_s: float = Field(
        60.0,
        gt=0,
        description="openai engine: longest silence between two stream chunks (the first one "
        "waits for the prefill) before the response fails.",
    )
    connect_retries: int = Field(
        2,
        ge=0,
        le=10,
        description="openai engine: extra connection attempts (backing off 0.25 s, 0.5 s, ...) "
        "before the response fails; never retried once the server has accepted the request.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vllm engine and `stepaudio vllm-command`: GPUs one model is sharded over "
        "(4 for the 130B Step-Audio-Chat).",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm engine: fraction of each GPU vLLM may take."
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Context window (prompt + reply tokens); none: the checkpoint's max_seq_len "
        "(32768).",
    )
    context_budget_tokens: int | None = Field(
        None,
        ge=16,
        description="Most tokens a prompt may use; the oldest text history is dropped to fit, the "
        "newest audio turn never. Dropping goes in steps of about a quarter of this, at points "
        "fixed by the conversation's beginning, so most turns extend the previous prompt (which "
        "vLLM's prefix cache then serves). None: max_model_len minus max_new_tokens.",
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=1,
        description="transformers engine: prompt tokens per forward, so a long prompt delays the "
        "other running replies by one chunk at a time.",
    )
    fast_decode: Switch = Field(
        "auto",
        description="transformers engine: decode all running replies in one batched step over a "
        "static KV cache (CUDA graphs + Triton kernels on a GPU). auto: on for Step1 on CUDA, and "
        "on CPU while the preallocated cache stays under 1 GiB (the tiny checkpoints); off: the "
        "per-request loop over the model's own forward; on: always.",
    )
    max_batch: int = Field(
        16,
        ge=1,
        le=256,
        description="transformers engine, fast path: replies decoded at once (KV-cache slots); "
        "further requests wait for a free slot.",
    )
    max_len: int = Field(
        8192,
        ge=16,
        description="transformers engine, fast path: tokens (prompt + reply) per KV-cache slot; "
        "the context window is the smaller of this and max_model_len. GPU memory: max_batch x "
        "max_len x 32 KiB for TTS-3B (4 GiB at 16 x 8192).",
    )
    max_waiting: int = Field(
        256,
        ge=0,
        description="transformers engine, fast path: requests that may wait for a free slot; one "
        "more is refused at once with an error.",
    )
    prefix_slots: int = Field(
        4,
        ge=0,
        le=64,
        description="transformers engine, fast path: extra KV-cache slots that keep recent "
        "prompts, so a prompt that starts like one of them (the history of the last turn) copies "
        "those keys instead of computing them again.",
    )
    temperature: float = Field(0.7, ge=0, description="Sampling temperature (0 = greedy).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(
        50,
        ge=0,
        description="Top-k cut (0 = off); 50 is what the reference's transformers generate() "
        "applied by default.",
    )
    max_new_tokens: int = Field(2048, ge=1, description="Longest reply in tokens.")
    seed: int | None = Field(
        None, description="Seed of the sampler (none: random); for reproducible tests."
    )

    def budget(self, max_model_len: int) -> int:
        """Prompt tokens allowed for a window of ``max_model_len`` tokens."""
        if self.context_budget_tokens is not None:
            return min(self.context_budget_tokens, max_model_len - 1)
        return max(1, max_model_len - self.max_new_tokens)


class TTSConfig(_Section):
    """Step-Audio-TTS-3B and its vocoders (flow matching + HiFT)."""

    engine: Literal["transformers", "openai"] = Field(
        "transformers",
        description="Where TTS-3B runs: transformers in this process on `device`; openai: a "
        "remote `vllm serve` of Step-Audio-TTS-3B (`stepaudio vllm-command --tts`). The flow and "
        "HiFT always run in this process on `device`.",
    )
    device: str = Field("cpu", description="Torch device of TTS-3B (in process), flow and HiFT.")
    lm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="In-process TTS-3B weight dtype; auto: float32 on CPU, bfloat16 on GPU."
    )
    base_url: EndpointList = Field(
        "http://127.0.0.1:8001/v1",
        description="openai engine: the TTS server's OpenAI API root, or a list of replicas "
        "(chosen and health-checked as for `llm.base_url`, with its `health_path` and interval).",
    )
    served_model_name: str = Field(
        "step-audio-tts-3b", description="openai engine: vllm --served-model-name of TTS-3B."
    )
    api_key_env: str | None = Field(
        None, description="openai engine: environment variable holding the TTS server's API key."
    )
    repetition_rule: OnOff = Field(
        "on",
        description="The reference samples TTS-3B with a repetition rule (a token filling more than "
        "a tenth of the last ten is banned for one step); without it TTS-3B stutters and loops. "
        "on: the transformers engine applies it, the openai engine asks the server for it with "
        "every request and refuses to start unless a check shows the server applies it (vLLM "
        "started as `stepaudio vllm-command --tts` prints). off: for a server that cannot apply "
        "it; sampled without the rule, and the server logs a warning.",
    )
    speakers_dir: Path | None = Field(
        None,
        description="Folder of `{id}_prompt.wav` + speakers_info.json; none: the model root's "
        "speakers/, else the packaged Tingting.",
    )
    max_batch: int = Field(
        16, ge=1, le=256,
        description="In-process TTS-3B: clauses decoded at once (one per speaking session); "
        "further clauses wait for a free slot.",
    )
    max_len: int = Field(
        4096, ge=256,
        description="In-process TTS-3B: tokens per KV-cache slot (speaker prompt + clause + its "
        "speech tokens). GPU memory: (max_batch + prefix_slots) x max_len x 32 KiB.",
    )
    prefix_slots: int = Field(
        4, ge=0, le=64,
        description="In-process TTS-3B: KV-cache slots that keep recent prompts; a clause in a "
        "voice already heard copies its ~900-token speaker prompt instead of computing it.",
    )
    stream_interval: int = Field(
        1, ge=1, le=64,
        description="In-process TTS-3B, fast path: speech tokens per delta handed to the synthesizer (the "
        "first at once). Above 1, many speaking sessions cost the event loop one wake-up per "
        "session every few decode steps instead of every step, at up to that many steps of "
        "delay per chunk.",
    )
    cuda_priority: int = Field(
        0, ge=-5, le=0,
        description="In-process TTS-3B on CUDA: priority of its decode stream (negative runs "
        "ahead of the vocoder's kernels when both wait for the GPU; 0: the default stream).",
    )
    batching: Switch = Field(
        "auto",
        description="Run the flow and HiFT of every speaking session through one scheduler that "
        "batches them across sessions (earliest deadline and first audio first). auto: on CUDA.",
    )
    max_batch_rows: int = Field(
        16, ge=1, le=64,
        description="Batched vocoder: at most this many windows in one flow or HiFT call.",
    )
    streaming: Literal["auto", "cosyvoice", "low-latency"] = Field(
        "auto",
        description="How flow and HiFT stream a reply. cosyvoice: CosyVoice's own streaming "
        "recipe (2 s token hops with a 20-token overlap, Hamming cross-fades, HiFT mel and "
        "excitation caches), checked against the output of CosyVoice's own streaming code on "
        "the tiny checkpoints; first audio after 103 tokens "
        "(about 2.5 s of speech to generate). low-latency: this project's windows (first audio "
        "after about 14 tokens, short look-ahead, raised-cosine cross-fades); checked against "
        "offline synthesis on random weights only, NOT YET VERIFIED ON THE PUBLISHED WEIGHTS. "
        "auto: cosyvoice for the real checkpoints (models.profile: real), low-latency for the "
        "tiny and random profiles.",
    )

    def streaming_mode(self, profile: str) -> str:
        """The mode ``auto`` stands for with this models profile."""
        if self.streaming != "auto":
            return self.streaming
        return "cosyvoice" if profile == "real" else "low-latency"


class SessionDefaults(_Section):
    """What a new session starts with; every client may change it with `session.update`."""

    instructions: str | None = Field(
        None, description="System prompt of the chat model; none: the reference demo's prompt."
    )
    voice: str = Field("Tingting", description="Step-Audio speaker id.")
    silence_duration_ms: int = Field(
        750, ge=100, le=10000, description="Silence that ends the user's turn."
    )
    pause_ms: int = Field(
        250, ge=50, le=5000, description="Silence that starts a speculative reply."
    )
    prefix_padding_ms: int = Field(
        300, ge=0, le=5000, description="Audio before the detected speech start kept in the turn."
    )
    min_barge_in_ms: int = Field(
        300, ge=0, le=5000, description="User speech this long interrupts the bot."
    )
    vad_threshold: float = Field(0.5, gt=0, lt=1, description="Silero speech probability.")
    speculative: bool = Field(True, description="Speculative replies at short pauses.")
    transcription: bool = Field(
        True, description="Send user-turn transcription events (the history is text either way)."
    )
    max_output_tokens: int | None = Field(
        None, ge=1, le=4096,
        description="Longest reply in tokens unless the client says otherwise "
        "(`max_output_tokens`); none: no limit below llm.max_new_tokens.",
    )
    max_transcript_tokens: int = Field(
        256, ge=1, description="Longest background transcription of one user turn, in tokens."
    )


class ServerConfig(_Section):
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8700, ge=0, le=65535, description="TCP port (0: any free port).")
    api_key_env: str | None = Field(
        "STEPAUDIO_API_KEY",
        description="Environment variable holding the API key clients must present (Authorization: "
        "Bearer KEY, or the `openai-insecure-api-key.KEY` subprotocol browsers use). Unset or "
        "empty: no key is asked. The key itself never goes in YAML.",
    )
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host names the server answers to, besides IP addresses and localhost "
        "(`.example.com` also matches its subdomains; `*`: any name); a request addressed to "
        "another name gets 403, which stops DNS-rebinding pages. None: a keyless server on "
        "loopback checks (IP addresses and localhost only), a server with an API key or one "
        "listening beyond loopback takes any name (it is reached through proxies and DNS).",
    )
    allowed_origins: list[str] = Field(
        default_factory=list,
        description="Web pages (origins such as `https://app.example.com`; `*`: any) that may "
        "open sessions besides pages from the host the request is addressed to and from "
        "localhost; others get 403 before the upgrade. Programs send no Origin and are not "
        "checked.",
    )
    max_sessions: int = Field(
        256, ge=1, description="Connections beyond this are refused with HTTP 503 and "
        "Retry-After (try again later)."
    )
    max_event_bytes: int = Field(
        21 * 1024 * 1024,
        ge=1024,
        description="Largest client message answered with an `error` (OpenAI allows 15 MiB of "
        "audio per append); a message over twice this closes the connection (1009).",
    )
    max_item_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest text of one item a client creates (UTF-8 bytes of its text and "
        "transcripts; also at most a quarter of max_send_queue_bytes, so its echoes always fit "
        "the send queue); a bigger one is refused with `item_too_large`.",
    )
    max_history_bytes: int = Field(
        8 * 1024 * 1024,
        ge=64 * 1024,
        description="History one session keeps (text as UTF-8, 4 bytes per audio token): an item "
        "a client creates past it is refused with `conversation_full` (delete items to make "
        "room); the server's own turns push the oldest items out instead.",
    )
    max_send_queue_bytes: int = Field(
        4 * 1024 * 1024,
        ge=64 * 1024,
        description="Server events queued for a client that does not read; past this the "
        "connection is closed (1008), so a stalled client cannot grow the server's memory.",
    )
    max_input_backlog_ms: int = Field(
        2000,
        ge=200,
        description="Received audio not yet analysed (VAD, tokenizer); past this the server stops "
        "reading that socket until it catches up (audio sent faster than real time).",
    )
    stall_grace_ms: int = Field(
        150,
        ge=20,
        description="When a client stops sending audio for longer than this, the turn clock runs "
        "on wall time (a client that goes quiet still gets an end of turn).",
    )
    tick_ms: int = Field(
        20, ge=1, le=200, description="Wall-clock tick of the VAD pump and turn timers."
    )
    tokenizer_threads: int = Field(
        2, ge=1, le=64, description="Threads feeding the streaming audio tokenizer."
    )
    warmup: bool = Field(
        True, description="Run a real short turn through every stage before /readyz says ready."
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, le=3600,
        description="Draining, on SIGTERM: new sessions are refused (HTTP 503, /readyz 503) and "
        "each session may finish its turn in flight (the user speaking, the reply generated, "
        "sent and played) for at most this long before it is closed with 1001 (a second SIGTERM "
        "closes them at once). The generated systemd unit's TimeoutStopSec is this plus 20 s.",
    )
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description="auto: uvloop when installed (`pip install uvloop`, a faster event loop), "
        "else asyncio's own.",
    )
    instrument: Literal["none", "zero-cost stages"] = Field(
        "none",
        description="Benchmark instrument, never for users: `zero-cost stages` replaces the "
        "tokenizer, chat model and TTS by stand-ins that cost nothing (the VAD stays real), so a "
        "load test measures the server's own overhead.",
    )
    instrument_latency_ms: int = Field(
        0,
        ge=0,
        le=10000,
        description="With `zero-cost stages`: the chat stand-in's first text arrives after this "
        "long, like a remote model of fixed latency that costs no CPU here (measures how much of "
        "a model's latency speculation hides).",
    )


class Config(_Section):
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    tts: TTSConfig = Field(default_factory=TTSConfig)
    session: SessionDefaults = Field(default_factory=SessionDefaults)
    server: ServerConfig = Field(default_factory=ServerConfig)


def _format_error(err: ValidationError, source: str) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = first["msg"]
        if "input" in first and not isinstance(first["input"], dict):
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {key}: {msg}{tail}"


def config_from_dict(data: dict[str, Any] | None, source: str = "config") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and validate a YAML config; ``None`` reads the default (tiny, CPU) profile."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    if not p.is_file():
        if path is None:  # installed without the repo's configs/: defaults are the same profile
            return Config()
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}: not valid YAML{where}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    return config_from_dict(data, str(p))
