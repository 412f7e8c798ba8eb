"""TokenPacker (arXiv 2407.02392): a trained projector that packs a g x g CLIP grid into (g/s) x (g/s) tokens.

Each "point query" (the ``-2`` layer's features, bilinearly down-sampled by ``s``) attends only to the s x s region
of multi-layer keys / values below it (layers 12, 16, 22, 23 of CLIP-L, concatenated, each through Linear-GELU-
Linear and a LayerNorm); one ``nn.MultiheadAttention``, no residual, no positional encoding, then the LLaVA MLP.
Parameter names are the authors' (``q_proj_1``, ``k_proj_1.{0,2}``, ``v_proj_1.{0,2}``, ``ln_{q,k,v}_1``,
``clip_attn``, ``mlp.{0,2}``), so their ``model.mm_projector.*`` tensors load as they are.

In a Hugging Face ``LlavaForConditionalGeneration`` the projector replaces ``multi_modal_projector`` and the config
asks the tower for ``vision_feature_layer = [12, 16, 22, 23, -2]``: transformers concatenates those layers'
features (CLS dropped) along channels, and :meth:`TokenPackerProjector.forward` splits them again. The processor
emits ``(g/s)^2`` image tokens (``patch_size = s * patch``). :func:`from_pretrained` loads such a folder;
:func:`convert` writes one from the authors' LLaVA-format checkpoint.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

#: CLIP-L/336 hidden-state indices the authors concatenate for keys / values (index 0 = embeddings)
KEY_LAYERS = (12, 16, 22, 23)
#: the config attribute that marks a TokenPacker LLaVA (holds the projector's hyperparameters)
CONFIG_KEY = "tokenpacker"


class TokenPackerProjector(nn.Module):
    """Region-to-point attention projector. Input (B, g*g, (n_key_layers + 1) * d): the key layers' features, then
    the query layer's; output (B, (g/s)^2, llm_hidden), row-major over the packed grid."""

    def __init__(self, vision_hidden: int = 1024, llm_hidden: int = 4096, scale_factor: int = 2, grid: int = 24,
                 num_heads: int | None = None, key_layers: int = len(KEY_LAYERS)):
        super().__init__()
        if scale_factor < 1 or grid % scale_factor:
            raise ValueError(f"TokenPacker: the {grid}x{grid} patch grid is not divisible by scale_factor="
                             f"{scale_factor}; allowed: a divisor of {grid}")
        d = vision_hidden
        self.vision_hidden, self.scale_factor, self.grid, self.key_layers = d, scale_factor, grid, key_layers
        self.num_queries = (grid // scale_factor) ** 2
        heads = num_heads or max(1, d // 128)
        self.q_proj_1 = nn.Linear(d, d, bias=False)
        self.k_proj_1 = nn.Sequential(nn.Linear(key_layers * d, d), nn.GELU(), nn.Linear(d, d))
        self.v_proj_1 = nn.Sequential(nn.Linear(key_layers * d, d), nn.GELU(), nn.Linear(d, d))
        self.ln_q_1, self.ln_k_1, self.ln_v_1 = (nn.LayerNorm(d, eps=1e-6) for _ in range(3))
        self.clip_attn = nn.MultiheadAttention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, llm_hidden), nn.GELU(), nn.Linear(llm_hidden, llm_hidden))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:  # the authors' init: trunc_normal(0.02), zero bias, unit LayerNorm
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def packed_grid(self) -> tuple[int, int]:
        g = self.grid // self.scale_factor
        return g, g

    def regions(self, x: torch.Tensor) -> torch.Tensor:
        """(B, g*g, C) -> (s*s, B*(g/s)^2, C): the keys of each packed cell, row-major over cells (the layout of
        ``nn.MultiheadAttention``'s sequence-first input)."""
        b, n, c = x.shape
        s, g = self.scale_factor, self.grid
        if n != g * g:
            raise ValueError(f"TokenPacker expects {g}x{g} = {g * g} patch tokens per image; got {n}")
        x = x.reshape(b, g // s, s, g // s, s, c).permute(2, 4, 0, 1, 3, 5)  # (s, s, B, g/s, g/s, C)
        return x.reshape(s * s, b * self.num_queries, c)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        d, kl = self.vision_hidden, self.key_layers
        if features.shape[-1] != (kl + 1) * d:
            raise ValueError(f"TokenPacker expects {kl} key layers + the query layer = {(kl + 1) * d} channels "
                             f"(vision_feature_layer = [..{kl} layers.., -2]); got {features.shape[-1]}")
        multi, single = features[..., : kl * d], features[..., kl * d:]
        b, n, _ = single.shape
        g, gq = self.grid, self.grid // self.scale_factor
        key = self.ln_k_1(self.k_proj_1(multi))
        value = self.ln_v_1(self.v_proj_1(multi))
        q = F.interpolate(single.reshape(b, g, g, d).float().permute(0, 3, 1, 2), size=(gq, gq), mode="bilinear",
                          align_corners=False).permute(0, 2, 3, 1).reshape(b, gq * gq, d).to(single.dtype)
        query = self.ln_q_1(self.q_proj_1(q)).reshape(1, b * gq * gq, d)
        out = self.clip_attn(query, self.regions(key), self.regions(value), need_weights=False)[0]
        return self.mlp(out.reshape(b, gq * gq, d))


def is_tokenpacker(module: nn.Module) -> bool:
    return isinstance(module, TokenPackerProjector)


def install(model: nn.Module) -> TokenPackerProjector:
    """Give a ``Llava*`` model whose config carries :data:`CONFIG_KEY` its TokenPacker projector (in place)."""
    base = model.model if hasattr(model, "lm_head") else model
    cfg = base.config
    spec = getattr(cfg, CONFIG_KEY, None)
    if not spec:
        raise ValueError(f"this config has no {CONFIG_KEY!r} entry: not a TokenPacker LLaVA")
    v = cfg.vision_config
    proj = TokenPackerProjector(v.hidden_size, cfg.text_config.hidden_size, int(spec["scale_factor"]),
                                v.image_size // v.patch_size, spec.get("num_heads"), len(spec["key_layers"]))
    ref = next(base.language_model.parameters())
    base.multi_modal_projector = proj.to(device=ref.device, dtype=ref.dtype)
    return proj


def tokenpacker_config(llava_config: Any, scale_factor: int = 2, key_layers: tuple[int, ...] = KEY_LAYERS,
                       num_heads: int | None = None) -> Any:
    """Mark a ``LlavaConfig`` as TokenPacker: the projector's settings and the tower layers it reads."""
    setattr(llava_config, CONFIG_KEY, {"scale_factor": scale_factor, "key_layers": list(key_layers),
                                       "num_heads": num_heads})
    llava_config.vision_feature_layer = list(key_layers) + [-2]
    llava_config.vision_feature_select_strategy = "default"
    return llava_config


def from_pretrained(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None, attn: str = "sdpa"):
    """A TokenPacker LLaVA folder (written by :func:`convert` or ``save_pretrained``) -> (model, processor)."""
    from transformers import AutoProcessor, LlavaConfig

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no config.json in {path}: pass a folder written by `vtc convert tokenpacker`")
    config = LlavaConfig.from_pretrained(path)
    if not getattr(config, CONFIG_KEY, None):
        raise ValueError(f"{path} is not a TokenPacker LLaVA (its config has no {CONFIG_KEY!r} entry)")
    config._attn_implementation = attn
    model = _empty_model(config)
    _load_weights_into(model, {_hf_key(k): v for k, v in _load_weights(path).items()}, path)
    model = model.to(device=device, dtype=dtype or torch.float32).eval()
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    return model, processor


def _hf_key(key: str) -> str:
    """save_pretrained's names -> the module names (5.x saves the LLaVA checkpoint layout of llava-hf)."""
    for old, new in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector."),
                     ("language_model.lm_head.", "lm_head.")):
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _empty_model(config: Any) -> nn.Module:
    """A TokenPacker LLaVA of ``config`` on the meta device (no memory, no random init): weights come next."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
        install(model)
    return model


def _load_weights_into(model: nn.Module, state: dict[str, torch.Tensor], where: Path) -> None:
    """Assign ``state`` to ``model``'s parameters; every key must match (a tied ``lm_head`` may be absent), else a
    clear error naming ``where``; then rebuild the non-persistent buffers."""
    cfg = model.config
    tied = getattr(cfg, "tie_word_embeddings", False) or getattr(cfg.text_config, "tie_word_embeddings", False)
    if tied and "lm_head.weight" not in state:
        state = dict(state, **{"lm_head.weight": state["model.language_model.embed_tokens.weight"]})
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not match a TokenPacker LLaVA: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    _rebuild_buffers(model)


def _rebuild_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (rotary inverse frequencies, position ids) stay on the meta device after an
    ``assign`` load: take them from a fresh CPU instance of the module that owns them."""
    for name, module in model.named_modules():
        meta = [b for b, buf in module._buffers.items() if buf is not None and buf.is_meta]
        if not meta:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"vtc: buffers {meta} of {name} were not loaded and cannot be rebuilt")
        with torch.device("cpu"):
            fresh = type(module)(module.config)
        for b in meta:
            module._buffers[b] = fresh._buffers[b]


#: the authors' ``conv_vicuna_v1`` prompt: system line, "USER: <image>\n{question} ASSISTANT:"
VICUNA_V1_TEMPLATE = (
    "{{ 'A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human\\'s questions. ' }}"
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
                 "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias", "tie_word_embeddings")


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: ``*.safetensors`` shards, else ``pytorch_model*.bin`` (weights only)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(f))
        return state
    files = sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    state = {}
    for f in files:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def _tower_key(key: str, target: set[str]) -> str | None:
    """A CLIP vision weight (hub layout ``vision_model.*``, or unprefixed) -> this release's name inside
    ``model.vision_tower`` (with or without its ``vision_model`` wrapper); None for text-tower weights."""
    key = key.removeprefix("vision_model.")
    for name in ("model.vision_tower." + key, "model.vision_tower.vision_model." + key):
        if name in target:
            return name
    return None


def _llava_key(key: str) -> str | None:
    """The authors' LLaVA-format names -> transformers' LlavaForConditionalGeneration names (None: not ours; the
    tower's own weights are mapped by :func:`_tower_key`)."""
    for old, new in (("model.mm_projector.", "model.multi_modal_projector."),
                     ("model.embed_tokens.", "model.language_model.embed_tokens."),
                     ("model.layers.", "model.language_model.layers."), ("model.norm.", "model.language_model.norm."),
                     ("lm_head.", "lm_head.")):
        if key.startswith(old):
            return new + key[len(old):]
    return None


def convert(src: str | Path, dst: str | Path, vision_tower: str | Path | None = None) -> Path:
    """Write a transformers folder (config, safetensors, tokenizer, processor with the authors' vicuna_v1 prompt and
    pad-to-square preprocessing) from a LLaVA-format TokenPacker checkpoint (``sunshine-lwt/TokenPacker-7b-144token``
    layout: ``model.mm_projector.*``, a Vicuna LM). ``vision_tower``: a local CLIP-L/336 folder, needed when the
    checkpoint does not hold the tower (LLaVA-format checkpoints load it from ``mm_vision_tower``)."""
    from transformers import (AutoTokenizer, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaImageProcessor,
                              LlavaProcessor)

    src, dst = Path(src), Path(dst)
    raw = json.loads((src / "config.json").read_text())
    if "scale_factor" not in raw:
        raise ValueError(f"{src}/config.json has no 'scale_factor': not a TokenPacker checkpoint")
    if raw.get("image_aspect_ratio") == "slice" or raw.get("patch_num"):
        raise ValueError("TokenPacker-HD (image_aspect_ratio='slice': dynamic crops with ',' / '\\n' separators) is "
                         "not supported yet; the 336-px checkpoints are")
    official = _load_weights(src)
    state = {new: v for k, v in official.items() if (new := _llava_key(k)) is not None}
    tower = {k.removeprefix("model.vision_tower.vision_tower."): v for k, v in official.items()
             if k.startswith("model.vision_tower.vision_tower.")}
    if not tower:
        if vision_tower is None:
            raise ValueError(f"{src} holds no vision tower weights: pass the local CLIP folder of "
                             f"{raw.get('mm_vision_tower', 'openai/clip-vit-large-patch14-336')} as vision_tower")
        tower = _load_weights(Path(vision_tower))
    vision_cfg = CLIPVisionConfig.from_pretrained(vision_tower or src)
    text_cfg = LlamaConfig(**{k: raw[k] for k in _LLAMA_FIELDS if k in raw})
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    if "<image>" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    vocab = -(-len(tok) // 64) * 64  # llava-hf pads the vocabulary to a multiple of 64
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        if name in state and state[name].shape[0] < vocab:
            w = state[name]
            state[name] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab - w.shape[0], -1)])
    text_cfg.vocab_size = vocab
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=text_cfg,
                      image_token_id=tok.convert_tokens_to_ids("<image>"), projector_hidden_act="gelu")
    tokenpacker_config(cfg, int(raw["scale_factor"]), KEY_LAYERS, num_heads=vision_cfg.hidden_size // 128)
    cfg.pad_token_id = tok.pad_token_id
    model = _empty_model(cfg)
    target = set(model.state_dict())
    state.update({new: v for k, v in tower.items() if (new := _tower_key(k, target)) is not None})
    _load_weights_into(model, state, src)
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst)
    pre = Path(vision_tower or src) / "preprocessor_config.json"
    norm = json.loads(pre.read_text()) if pre.exists() else {}
    # the authors' expand2square (mean-colour padding), then CLIP's resize + centre crop
    image_processor = LlavaImageProcessor(
        do_pad=True, size={"shortest_edge": vision_cfg.image_size},
        crop_size={"height": vision_cfg.image_size, "width": vision_cfg.image_size},
        image_mean=norm.get("image_mean", [0.48145466, 0.4578275, 0.40821073]),
        image_std=norm.get("image_std", [0.26862954, 0.26130258, 0.27577711]))
    LlavaProcessor(image_processor=image_processor, tokenizer=tok,
                   patch_size=vision_cfg.patch_size * int(raw["scale_factor"]),
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=VICUNA_V1_TEMPLATE, image_token="<image>").save_pretrained(dst)
    return dst
