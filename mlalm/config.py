"""Typed, validated configuration.

A run is described by one :class:`Config`: frozen dataclasses, one per section
(``model``, ``attention``, ``moe``, ``optim``, ``data``, ``train``, ``mesh``).  YAML
files name only what differs from the defaults (or from the file a top-level
``base: other.yaml`` names); command-line overrides are dotted ``section.key=value``
strings parsed as YAML scalars.

Everything that can be checked without building the model is checked here, so that a
bad config fails in milliseconds with a :class:`ConfigError` that names the key and
what would be valid -- never after minutes of compilation.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import yaml

from mlalm.errors import ConfigError
from mlalm.validation import validate


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int | None = None  # None: taken from the tokenizer
    d_model: int = 256
    n_layers: int = 4
    ffn_dim: int = 768  # dense SwiGLU width (dense layers and MoE-off models)
    max_seq_len: int = 1024  # positions the model supports
    norm_eps: float = 1e-6
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    init_std: float = 0.02
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype
    # multi-token prediction (DeepSeek-V3): D sequential modules, depth k predicting the
    # token k + 1 ahead (0: off; docs/architecture.md, "Multi-token prediction")
    mtp_depth: int = 0


@dataclass(frozen=True)
class AttentionConfig:
    kind: Literal["mla", "mha", "gqa", "mqa"] = "mla"
    n_heads: int = 4
    # MHA/GQA/MQA
    n_kv_heads: int | None = None  # gqa: required; mha: = n_heads; mqa: 1
    head_dim: int = 64
    # MLA
    q_lora_rank: int = 0  # 0: no q low-rank projection (W_q h directly)
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RMSNorm on the latent c_kv, as DeepSeek (true); false: c_kv = W_kva h as is, which
    # models converted from MHA/GQA/MQA need to compute exactly what they computed
    # (mlalm.convert; docs/architecture.md, "MLA")
    kv_latent_norm: bool = True
    impl: Literal["xla", "pallas"] = "xla"


@dataclass(frozen=True)
class MoEConfig:
    n_routed_experts: int = 0  # 0: dense SwiGLU feed-forward everywhere
    n_shared_experts: int = 1
    top_k: int = 2
    expert_ffn_dim: int = 128  # width of one routed (and one shared) expert
    first_k_dense_replace: int = 0  # the first k layers use the dense FFN
    scoring: Literal["sigmoid", "softmax"] = "sigmoid"  # V3: sigmoid, V2: softmax
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 1e-3  # gamma of aux-loss-free balancing; 0 disables
    seq_aux_loss_coef: float = 0.0  # alpha of the sequence-wise balance loss
    dispatch: Literal["auto", "dropless", "capacity"] = "auto"  # auto: dropless on every backend
    capacity_factor: float = 1.25


@dataclass(frozen=True)
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-3  # AdamW's; with muon, the Adam side's (unless adam_lr is set)
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: fraction of steps spent decaying
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    decay_embeddings: bool = False
    clip_norm: float = 1.0  # 0 disables global-norm clipping
    # Muon (optim.name=muon): hidden matrices; embeddings, head, norms, router use Adam
    muon_lr: float = 0.01  # the Muon matrices' peak learning rate (its own: see docs/results.md)
    muon_variant: Literal["quintic", "polar_express", "normuon"] = "quintic"
    normuon_beta2: float = 0.95  # muon_variant=normuon: decay of the per-neuron second moment
    adam_lr: float | None = None  # the Adam side's peak learning rate (None: optim.lr)
    muon_momentum: float = 0.95  # Nesterov momentum
    muon_weight_decay: float | None = None  # None: optim.weight_decay
    ns_steps: int = 5
    # quintic Newton-Schulz coefficients (a, b, c): p(x) = a x + b x^3 + c x^5; several
    # triples ([[a, b, c], ...]) give one per step (the first ns_steps are used);
    # muon_variant=polar_express brings its own schedule instead
    ns_coeffs: tuple = (3.4445, -4.7750, 2.0315)
    qk_clip_tau: float | None = None  # QK-clip threshold on attention logits (Kimi K2: 100)
    muon_scale: Literal["rms", "shape"] = (
        "rms"  # rms: 0.2*sqrt(max(fan_in, fan_out)); shape: sqrt(max(1, fan_out/fan_in))
    )


@dataclass(frozen=True)
class DataConfig:
    # text (a file, directory or glob: text, JSON Lines, parquet, .gz/.zst) prepared into the
    # cache once, or a directory made by scripts/prepare.py; None: the built-in corpus
    path: str | None = None
    val_path: str | None = None  # evaluated whole; data.path is then not split
    val_fraction: float = 0.1  # of data.path's documents (of its bytes for a single document)
    test_path: str | None = None  # evaluated once at the end of training when set
    tokenizer: str = "byte"  # byte | bpe (trained on the training split) | path of a tokenizer.json
    eos_token: str | None = None  # end-of-text token of a tokenizer.json (None: found by name)
    bpe_vocab_size: int = 8192
    text_key: str = "text"  # JSON field / parquet column holding the text
    # [{path: DIR, weight: w}, ...]: train on prepared directories mixed by weight (instead of path)
    mix: tuple | None = None
    cache_dir: str | None = None  # None: ~/.cache/mlalm
    prepare_workers: int = 0  # processes encoding raw text (0: one per core)
    max_memory: str = "2GB"  # peak memory of preparing raw text, all processes together
    shard_mb: int = 256  # size of each token file of a prepared directory
    num_workers: int = 0  # Grain threads reading training batches (0: one)
    prefetch: int = 2  # batches Grain reads ahead

    class _MixEntry(dict):
        """A data.mix entry, hashable like the rest of the frozen config (models keep the
        config as a static attribute, and jit hashes it)."""

        def __hash__(self):
            return hash(tuple(sorted((k, str(v)) for k, v in self.items())))

    def __post_init__(self):
        if isinstance(self.mix, (list, tuple)):
            object.__setattr__(
                self, "mix", tuple(DataConfig._MixEntry(e) if isinstance(e, dict) else e for e in self.mix)
            )


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    loss_chunk: int = 256  # tokens per chunk of the fused LM head + loss (0: plain logits)
    mtp_loss_weight: float = 0.3  # lambda: loss = main + lambda / D * sum of the D MTP losses
    seed: int = 0
    run_dir: str = "runs"
    name: str | None = None  # None: derived from the config file name
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20  # periodic validation: batches (0: the whole split)
    final_eval_batches: int = 0  # end of run: batches (0: the whole split)
    on_nonfinite: Literal["stop", "skip"] = "stop"
    max_consecutive_skips: int = 10  # on_nonfinite=skip: stop after this many skips in a row
    # start from these weights (a run, checkpoint, params export, or transformers directory):
    # step 0, fresh optimizer, the model sections and tokenizer of the source
    init_from: str | None = None
    compile_cache: bool = True  # JAX's persistent compilation cache in data.cache_dir/jax
    progress: bool = True
    # 'auto': continue from the newest complete checkpoint of the run directory (a run
    # that finished starts a new directory); 'never': always start afresh; or a path to a
    # checkpoint (a run directory, its checkpoints/ directory, or one step directory)
    resume: str = "auto"


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (0: only at the end and on SIGTERM/SIGINT)
    keep: int = 3  # the newest N checkpoints are kept ...
    keep_best: bool = True  # ... plus the one with the lowest validation loss
    async_save: bool = True  # write in the background while training continues


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    # multi-process (jax.distributed): 'env' initialises when a coordinator is given here
    # or in JAX_COORDINATOR_ADDRESS; 'auto' lets JAX detect SLURM / TPU pods; 'off' never
    distributed: Literal["env", "auto", "off"] = "env"
    coordinator: str | None = None  # host:port of process 0
    num_processes: int | None = None
    process_id: int | None = None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    # -- derived quantities used across the code base --------------------------------
    @property
    def n_kv_heads(self) -> int:
        a = self.attention
        if a.kind == "mha":
            return a.n_heads
        if a.kind == "mqa":
            return 1
        if a.kind == "gqa":
            assert a.n_kv_heads is not None, "attention.n_kv_heads must be set for kind=gqa (validation.py)"
            return a.n_kv_heads
        return a.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe.n_routed_experts > 0 and layer >= self.moe.first_k_dense_replace

    def to_dict(self) -> dict:
        def plain(x):  # tuples as lists, so that YAML and JSON can write them
            if isinstance(x, dict):
                return {k: plain(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return [plain(v) for v in x]
            return x

        return typing.cast(dict, plain(dataclasses.asdict(self)))  # a dict stays a dict


SECTIONS = {f.name: f.type for f in fields(Config)}


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _did_you_mean(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check (and gently convert) ``value`` against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is Literal:
        if value not in args:
            valid = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{key}: {value!r} is not one of {valid}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads "3e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is tuple:
        if isinstance(value, (list, tuple)):
            return tuple(tuple(v) if isinstance(v, list) else v for v in value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def check_structure(raw, where: str = "config") -> None:
    """Sections that exist and are mappings, keys that exist; ``where`` (a file name)
    starts the message."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(raw).__name__}")
    classes = _section_classes()
    for section, values in raw.items():
        if section not in classes:
            raise ConfigError(
                f"{where}: unknown config section '{section}'{_did_you_mean(section, classes)} "
                f"(valid: {', '.join(classes)})"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(
                f"{where}: section '{section}' must be a mapping of keys "
                f"(e.g. '{section}:' then indented 'key: value' lines), got {values!r}"
            )
        hints = typing.get_type_hints(classes[section])
        for key in values:
            if key not in hints:
                raise ConfigError(f"{where}: unknown config key '{section}.{key}'{_did_you_mean(key, hints)}")


def from_dict(raw: dict | None, base: Config | None = None) -> Config:
    """Build a validated Config from a nested dict, on top of ``base`` (or defaults)."""
    cfg = base or Config()
    raw = raw or {}
    check_structure(raw)
    classes = _section_classes()
    new_sections = {}
    for section, values in raw.items():
        if values is None:
            continue
        hints = typing.get_type_hints(classes[section])
        updates = {}
        for key, value in values.items():
            updates[key] = _coerce(f"{section}.{key}", value, hints[key])
        new_sections[section] = replace(getattr(cfg, section), **updates)
    cfg = replace(cfg, **new_sections)
    validate(cfg)
    return cfg


def parse_overrides(overrides: list[str]) -> dict:
    """``['model.n_layers=4', 'data.path=x.txt']`` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, _, text = item.partition("=")
        parts = key.strip().split(".")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"override key '{key}' must be section.key, e.g. model.n_layers")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            value = text
        out.setdefault(parts[0], {})[parts[1]] = value
    return out


def given_keys(path: str | os.PathLike | None, overrides: list[str] | None) -> set[tuple[str, str]]:
    """The (section, key) pairs a config file (with its ``base`` chain) and overrides set."""
    raw = _merge(_read_yaml(path) if path is not None else {}, parse_overrides(overrides or []))
    return {(s, k) for s, values in raw.items() if isinstance(values, dict) for k in values}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply dotted overrides.

    Raises:
        ConfigError: unknown section or key, wrong type, inconsistent values, or a
            missing/unreadable file.
    """
    raw = _read_yaml(path) if path is not None else {}
    raw = _merge(raw, parse_overrides(overrides or []))
    return from_dict(raw)


def _read_yaml(path, _seen=()) -> dict:
    """A config file as a dict; a top-level ``base: other.yaml`` (relative to the file) is
    read first and this file's keys override it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        what = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML: {what}{where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path} cannot be read: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: expected a mapping of sections")
    base = raw.pop("base", None)
    check_structure(raw, f"config file {path}")
    if base is None:
        return raw
    base_path = os.path.join(os.path.dirname(os.path.abspath(path)), str(base))
    if os.path.abspath(base_path) in _seen:
        raise ConfigError(f"config file {path}: 'base' chain loops back to {base}")
    return _merge(_read_yaml(base_path, _seen + (os.path.abspath(path),)), raw)


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_keys() -> str:
    """Every key with its type and default, for ``train.py --help``."""
    lines = []
    default = Config()
    for section, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) is Literal:
                tname = "|".join(str(a) for a in typing.get_args(tp))
            else:
                tname = "list" if tp is tuple else getattr(tp, "__name__", str(tp)).replace("typing.", "")
                if typing.get_origin(tp) in (typing.Union, types.UnionType):
                    inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
                    tname = f"{inner.__name__}|null"
            lines.append(
                f"  {section}.{f.name:<24} {tname:<28} "
                f"default: {getattr(getattr(default, section), f.name)!r}"
            )
    return "\n".join(lines)
