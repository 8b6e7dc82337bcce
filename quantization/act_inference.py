"""An inference-only re-expression of lerobot's ACT forward pass, built from a loaded ACTPolicy.

Same weights, same arithmetic, different structure, so that it exports and quantizes cleanly:
- attention uses separate q/k/v `nn.Linear` layers (lerobot's `nn.MultiheadAttention` hides its packed
  input projection from `quantize_dynamic`);
- image tokens are concatenated as one tensor instead of lerobot's per-token list/stack;
- constants are precomputed: the latent token (the VAE latent is zero at inference, so its projection is
  the bias), the position embeddings (learned and 2-D sinusoidal), and, because the decoder's input is all
  zeros, the first decoder layer's self-attention block and its cross-attention queries;
- the VAE encoder (training only) is dropped;
- the ResNet backbone's FrozenBatchNorm2d layers are folded into the preceding convolutions, and residual
  additions use `FloatFunctional` so the backbone can be statically quantized;
- normalization of the state and images, and un-normalization of the actions, are baked in from the
  policy's pre/post-processor statistics.

Calling convention (see `rover_runtime.bundle`): `model(state, image_0, ..., image_k)` with `state` float32
[B, state_dim] in real units and images float32 [B, 3, H, W] RGB in [0, 1]; returns float32
[B, chunk_size, action_dim] in real units.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub

from quantization.errors import QuantizationError

log = logging.getLogger(__name__)

STATE_KEY = "observation.state"
ACTION_KEY = "action"


@dataclass(frozen=True)
class ModelSpec:
    """What the re-expressed model consumes and produces (the manifest's input/output spec)."""

    state_dim: int
    image_keys: tuple[str, ...]
    image_shapes: tuple[tuple[int, int, int], ...]
    action_dim: int
    chunk_size: int
    n_action_steps: int
    temporal_ensemble_coeff: float | None

    def example_inputs(self, batch: int = 1) -> tuple[Tensor, ...]:
        gen = torch.Generator().manual_seed(0)
        state = torch.randn(batch, self.state_dim, generator=gen)
        images = [torch.rand(batch, *shape, generator=gen) for shape in self.image_shapes]
        return (state, *images)


class Normalize(nn.Module):
    """`(x - sub) / div + add`: lerobot's MEAN_STD / MIN_MAX / QUANTILE normalization as constants."""

    sub: Tensor
    div: Tensor
    add: Tensor

    def __init__(self, sub: Tensor, div: Tensor, add: Tensor) -> None:
        super().__init__()
        self.register_buffer("sub", sub.detach().clone().float())
        self.register_buffer("div", div.detach().clone().float())
        self.register_buffer("add", add.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.sub) / self.div + self.add


# The module of InferenceACT that turns the action head's normalized output into real units. Every static
# INT8 model leaves it in float: quantized, the model's output is rounded to 256 steps spread over every
# action dimension's real range at once (on the tiny test policy that alone was a quarter of ExecuTorch's
# INT8 error: 0.47 % of the action range with it quantized, 0.35 % without; docs/quantization.md).
FLOAT_OUTPUT_MODULE = "action_unnorm"


class Unnormalize(nn.Module):
    """`x * mul + add`: lerobot's inverse normalization as constants."""

    mul: Tensor
    add: Tensor

    def __init__(self, mul: Tensor, add: Tensor) -> None:
        super().__init__()
        self.register_buffer("mul", mul.detach().clone().float())
        self.register_buffer("add", add.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mul + self.add


def _fold_frozen_bn(conv: Any, bn: Any) -> nn.Conv2d:
    """A Conv2d with bias computing `bn(conv(x))` for torchvision's FrozenBatchNorm2d."""
    scale = bn.weight * (bn.running_var + bn.eps).rsqrt()
    bias = bn.bias - bn.running_mean * scale
    folded = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
    )
    with torch.no_grad():
        folded.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
        conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(bias)
        folded_bias = folded.bias
        assert folded_bias is not None
        folded_bias.copy_(conv_bias * scale + bias)
    return folded


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock with batch norm folded and a quantizable residual add."""

    def __init__(self, block: Any) -> None:
        super().__init__()
        self.conv1 = _fold_frozen_bn(block.conv1, block.bn1)
        self.relu1 = nn.ReLU()
        self.conv2 = _fold_frozen_bn(block.conv2, block.bn2)
        down = block.downsample
        self.downsample: nn.Module = nn.Identity() if down is None else _fold_frozen_bn(down[0], down[1])
        self.add_relu = FloatFunctional()

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x)
        out = self.relu1(self.conv1(x))
        out = self.conv2(out)
        return self.add_relu.add_relu(out, identity)


class ImageEncoder(nn.Module):
    """ResNet trunk (to layer4) plus ACT's 1x1 input projection; the region static quantization covers."""

    def __init__(self, resnet_trunk: Any, input_proj: Any) -> None:
        super().__init__()
        self.quant = QuantStub()
        self.stem_conv = _fold_frozen_bn(resnet_trunk.conv1, resnet_trunk.bn1)
        self.stem_relu = nn.ReLU()
        self.maxpool = resnet_trunk.maxpool
        layers = []
        for name in ("layer1", "layer2", "layer3", "layer4"):
            blocks = list(getattr(resnet_trunk, name))
            if not all(type(b).__name__ == "BasicBlock" for b in blocks):
                raise QuantizationError(
                    "only ResNet backbones made of BasicBlocks (resnet18, resnet34) are supported"
                )
            layers.append(nn.Sequential(*(BasicBlock(b) for b in blocks)))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.proj = nn.Conv2d(input_proj.in_channels, input_proj.out_channels, kernel_size=1)
        self.proj.load_state_dict(input_proj.state_dict())
        self.dequant = DeQuantStub()

    def fusion_groups(self) -> list[list[str]]:
        """Conv + ReLU pairs to fuse before static quantization."""
        groups = [["stem_conv", "stem_relu"]]
        for layer in ("layer1", "layer2", "layer3", "layer4"):
            for i in range(len(getattr(self, layer))):
                groups.append([f"{layer}.{i}.conv1", f"{layer}.{i}.relu1"])
        return groups

    def forward(self, x: Tensor) -> Tensor:
        x = self.quant(x)
        x = self.maxpool(self.stem_relu(self.stem_conv(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out: Tensor = self.dequant(self.proj(x))
        return out


class Attention(nn.Module):
    """nn.MultiheadAttention (eval, no masks) with separate q/k/v projections."""

    def __init__(self, mha: Any) -> None:
        super().__init__()
        dim = mha.embed_dim
        if mha.in_proj_weight is None or mha.in_proj_bias is None:
            raise QuantizationError("attention layers with separate k/v dimensions are not supported")
        self.dim = dim
        self.n_heads = mha.num_heads
        self.head_dim = dim // mha.num_heads
        self.scale = float(self.head_dim) ** -0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        with torch.no_grad():
            for i, proj in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                proj.weight.copy_(mha.in_proj_weight[i * dim : (i + 1) * dim])
                proj.bias.copy_(mha.in_proj_bias[i * dim : (i + 1) * dim])
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """(L, B, D) queries over (S, B, D) keys/values -> (L, B, D)."""
        return self.attend(self.q_proj(query), key, value)

    def attend(self, projected_query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """The attention of already projected (L, B, D) queries over (S, B, D) keys/values."""
        q_len = projected_query.shape[0]
        q = projected_query.reshape(q_len, -1, self.head_dim).transpose(0, 1)
        k = self.k_proj(key).reshape(key.shape[0], -1, self.head_dim).transpose(0, 1)
        v = self.v_proj(value).reshape(value.shape[0], -1, self.head_dim).transpose(0, 1)
        weights = torch.softmax(torch.bmm(q * self.scale, k.transpose(1, 2)), dim=-1)
        out = torch.bmm(weights, v).transpose(0, 1).reshape(q_len, -1, self.dim)
        projected: Tensor = self.out_proj(out)
        return projected


def _activation(name: str, x: Tensor) -> Tensor:
    if name == "relu":
        return torch.relu(x)
    if name == "gelu":
        return nn.functional.gelu(x)
    return nn.functional.glu(x)


class EncoderLayer(nn.Module):
    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.self_attn = Attention(layer.self_attn)
        self.linear1 = _copy_linear(layer.linear1)
        self.linear2 = _copy_linear(layer.linear2)
        self.norm1 = layer.norm1
        self.norm2 = layer.norm2
        self.pre_norm = bool(layer.pre_norm)
        self.activation = _activation_name(layer.activation)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        skip = x
        if self.pre_norm:
            x = self.norm1(x)
        qk = x + pos
        x = skip + self.self_attn(qk, qk, x)
        if self.pre_norm:
            skip = x
            x = self.norm2(x)
        else:
            x = self.norm1(x)
            skip = x
        x = skip + self.linear2(_activation(self.activation, self.linear1(x)))
        if not self.pre_norm:
            x = self.norm2(x)
        return x


class DecoderLayer(nn.Module):
    start_x: Tensor
    start_skip: Tensor
    start_query: Tensor

    def __init__(self, layer: Any) -> None:
        super().__init__()
        self.self_attn: Attention | None = Attention(layer.self_attn)
        self.cross_attn = Attention(layer.multihead_attn)
        self.linear1 = _copy_linear(layer.linear1)
        self.linear2 = _copy_linear(layer.linear2)
        self.norm1 = layer.norm1
        self.norm2 = layer.norm2
        self.norm3 = layer.norm3
        self.pre_norm = bool(layer.pre_norm)
        self.activation = _activation_name(layer.activation)
        self.constant_start = False

    def fold_zero_input(self, pos: Tensor) -> None:
        """Precompute what does not depend on the observation when this layer's input is all zeros (ACT's
        first decoder layer at inference): the self-attention block and the cross-attention's projected
        queries become constants ((L, 1, D) buffers), and their weights are dropped."""
        with torch.no_grad():
            x, skip = self._self_block(torch.zeros_like(pos), pos)
            query = self.cross_attn.q_proj(x + pos)
        self.register_buffer("start_x", x.clone())
        self.register_buffer("start_skip", skip.clone())
        self.register_buffer("start_query", query.clone())
        self.self_attn = None
        del self.cross_attn.q_proj
        self.constant_start = True

    def _self_block(self, x: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        assert self.self_attn is not None
        skip = x
        if self.pre_norm:
            x = self.norm1(x)
        qk = x + pos
        x = skip + self.self_attn(qk, qk, x)
        if self.pre_norm:
            skip = x
            x = self.norm2(x)
        else:
            x = self.norm1(x)
            skip = x
        return x, skip

    def forward(self, x: Tensor, memory: Tensor, pos: Tensor, memory_pos: Tensor) -> Tensor:
        if self.constant_start:
            batch = memory.shape[1]
            skip = self.start_skip.expand(-1, batch, -1)
            query = self.start_query.expand(-1, batch, -1)
            x = self.start_x.expand(-1, batch, -1)
        else:
            x, skip = self._self_block(x, pos)
            query = self.cross_attn.q_proj(x + pos)
        x = skip + self.cross_attn.attend(query, memory + memory_pos, memory)
        if self.pre_norm:
            skip = x
            x = self.norm3(x)
        else:
            x = self.norm2(x)
            skip = x
        x = skip + self.linear2(_activation(self.activation, self.linear1(x)))
        if not self.pre_norm:
            x = self.norm3(x)
        return x


def _copy_linear(src: Any) -> nn.Linear:
    dst = nn.Linear(src.in_features, src.out_features, bias=src.bias is not None)
    dst.load_state_dict(src.state_dict())
    return dst


def _activation_name(fn: Any) -> str:
    name = getattr(fn, "__name__", "")
    if name not in ("relu", "gelu", "glu"):
        raise QuantizationError(f"unsupported feed-forward activation {fn!r}")
    return name


class InferenceACT(nn.Module):
    """ACT at inference: real-unit state and [0, 1] images in, real-unit action chunk out."""

    latent_token: Tensor
    encoder_pos: Tensor
    decoder_pos: Tensor
    decoder_zeros: Tensor

    def __init__(
        self,
        act: Any,
        state_norm: Normalize,
        image_norms: list[Normalize],
        action_unnorm: Unnormalize,
        image_shapes: list[tuple[int, int, int]],
    ) -> None:
        super().__init__()
        cfg = act.config
        self.dim = int(cfg.dim_model)
        self.chunk_size = int(cfg.chunk_size)
        self.state_norm = state_norm
        self.image_norms = nn.ModuleList(image_norms)
        self.action_unnorm = action_unnorm
        trunk = act.backbone  # IntermediateLayerGetter over a torchvision ResNet
        self.image_encoder = ImageEncoder(trunk, act.encoder_img_feat_input_proj)
        # One encoder per camera, or None: every camera runs `image_encoder` (see `unshare_image_encoder`).
        self.camera_encoders: nn.ModuleList | None = None
        self.state_proj = _copy_linear(act.encoder_robot_state_input_proj)
        self.encoder_layers = nn.ModuleList(EncoderLayer(layer) for layer in act.encoder.layers)
        self.encoder_norm = act.encoder.norm  # LayerNorm with pre_norm, else Identity
        self.decoder_layers = nn.ModuleList(DecoderLayer(layer) for layer in act.decoder.layers)
        self.decoder_norm = act.decoder.norm
        self.action_head = _copy_linear(act.action_head)
        with torch.no_grad():
            # The VAE latent is all zeros at inference: its projection is the bias alone.
            latent = act.encoder_latent_input_proj(torch.zeros(1, act.config.latent_dim))
            self.register_buffer("latent_token", latent.reshape(1, 1, self.dim).clone())
            cam_pos = []
            for shape in image_shapes:
                features = act.backbone(torch.zeros(1, *shape))["feature_map"]
                pos = act.encoder_cam_feat_pos_embed(features)  # (1, D, h, w)
                cam_pos.append(pos.flatten(2).permute(2, 0, 1))  # (h*w, 1, D)
            pos_1d = act.encoder_1d_feature_pos_embed.weight.unsqueeze(1)  # (2, 1, D): latent, state
            self.register_buffer("encoder_pos", torch.cat([pos_1d, *cam_pos], dim=0).clone())
            decoder_pos = act.decoder_pos_embed.weight[: self.chunk_size].unsqueeze(1)  # (chunk, 1, D)
            self.register_buffer("decoder_pos", decoder_pos.clone())
        self.register_buffer("decoder_zeros", torch.zeros(self.chunk_size, 1, self.dim))
        for first in self.decoder_layers[:1]:
            assert isinstance(first, DecoderLayer)
            first.fold_zero_input(self.decoder_pos)  # its input is all zeros

    def forward(self, state: Tensor, *images: Tensor) -> Tensor:
        batch = state.shape[0]
        tokens = [
            self.latent_token.expand(1, batch, self.dim),
            self.state_proj(self.state_norm(state)).reshape(1, batch, self.dim),
        ]
        for i, norm in enumerate(self.image_norms):
            encoder = self.image_encoder if self.camera_encoders is None else self.camera_encoders[i]
            features = encoder(norm(images[i]))  # (B, D, h, w)
            tokens.append(features.flatten(2).permute(2, 0, 1))  # (h*w, B, D)
        x = torch.cat(tokens, dim=0)
        pos = self.encoder_pos
        for enc in self.encoder_layers:
            x = enc(x, pos)
        memory = self.encoder_norm(x)
        y = self.decoder_zeros.expand(self.chunk_size, batch, self.dim)
        for dec in self.decoder_layers:
            y = dec(y, memory, self.decoder_pos, pos)
        y = self.decoder_norm(y).transpose(0, 1)  # (B, chunk, D)
        actions: Tensor = self.action_unnorm(self.action_head(y))
        return actions


def unshare_image_encoder(model: InferenceACT) -> InferenceACT:
    """A copy of `model` in which each camera has its own copy of the image encoder (same weights).

    ACT runs one backbone for every camera. A quantizer that annotates a shared weight only at its first use
    (the PT2E XNNPACK quantizer does) leaves every later camera's backbone in float, and XNNPACK then refuses
    its first convolution (float input and filter with an INT8 bias). With a copy per camera every use is
    quantized; the copies' INT8 weights are byte for byte the same, and ExecuTorch stores identical constant
    data once, so the program does not grow with the number of cameras.
    """
    copy_ = copy.deepcopy(model)
    copy_.camera_encoders = nn.ModuleList(copy.deepcopy(model.image_encoder) for _ in model.image_norms)
    del copy_.image_encoder  # forward uses camera_encoders now
    return copy_


# --- building from lerobot ------------------------------------------------------------------------


def _find_step(pipeline: Any, class_name: str) -> Any:
    for step in getattr(pipeline, "steps", []):
        if type(step).__name__ == class_name:
            return step
    raise QuantizationError(f"the policy's processor pipeline has no {class_name} step")


def _norm_mode(step: Any, feature_type_name: str) -> str:
    for ftype, mode in step.norm_map.items():
        if getattr(ftype, "value", ftype) == feature_type_name:
            return str(getattr(mode, "value", mode))
    return "IDENTITY"


def _stats(step: Any, key: str, mode: str) -> Any:
    """The statistics `step` normalizes `key` with; missing ones are refused, never taken as identity
    (lerobot itself would then pass the feature through unnormalized, and the policy would misbehave)."""
    stats = step._tensor_stats.get(key)
    if not stats:
        raise QuantizationError(
            f"the policy's normalization statistics for {key!r} ({mode}) are missing from its "
            f"{type(step).__name__} state: refusing to bake in an identity normalization"
        )
    return stats


def _affine(step: Any, key: str, feature_type: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """(sub, div, add) with normalized = (x - sub) / div + add, exactly as lerobot's step computes it."""
    mode = _norm_mode(step, feature_type)
    zeros, ones = torch.zeros(shape), torch.ones(shape)
    if mode == "IDENTITY":
        return zeros, ones, zeros
    stats = _stats(step, key, mode)
    eps = float(step.eps)
    low_high = {"MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}
    try:
        if mode == "MEAN_STD":
            mean, std = stats["mean"].float(), stats["std"].float()
            return mean, std + eps, torch.zeros_like(mean)
        if mode in low_high:
            low, high = (stats[name].float() for name in low_high[mode])
            denom = high - low
            denom = torch.where(denom == 0, torch.full_like(denom, eps), denom)
            return low, denom / 2, -torch.ones_like(low)
    except KeyError as exc:
        raise QuantizationError(f"normalization statistics for {key!r} lack {exc} ({mode})") from exc
    raise QuantizationError(f"unsupported normalization mode {mode} for {key!r}")


def _inverse_affine(step: Any, key: str, feature_type: str, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """(mul, add) with real = normalized * mul + add, as lerobot's unnormalizer computes it."""
    mode = _norm_mode(step, feature_type)
    if mode == "IDENTITY":
        return torch.ones(shape), torch.zeros(shape)
    stats = _stats(step, key, mode)
    if mode == "MEAN_STD":
        return stats["std"].float(), stats["mean"].float()
    sub, div, _ = _affine(step, key, feature_type, shape)
    return div, div + sub


def model_spec(config: Any) -> ModelSpec:
    """The input/output spec of an ACT config; refuses configurations the re-expression does not cover."""
    if config.robot_state_feature is None:
        raise QuantizationError(
            f"the policy has no '{STATE_KEY}' input (lerobot's ACT needs it at inference)"
        )
    if config.env_state_feature is not None:
        raise QuantizationError("policies with an environment-state input are not supported")
    if not config.image_features:
        raise QuantizationError("the policy has no camera input")
    if config.n_obs_steps != 1:
        raise QuantizationError(f"n_obs_steps {config.n_obs_steps} is not supported (only 1)")
    if config.action_feature is None:
        raise QuantizationError(f"the policy has no '{ACTION_KEY}' output")
    return ModelSpec(
        state_dim=int(config.robot_state_feature.shape[0]),
        image_keys=tuple(config.image_features),
        image_shapes=tuple(tuple(int(s) for s in ft.shape) for ft in config.image_features.values()),  # type: ignore[misc]
        action_dim=int(config.action_feature.shape[0]),
        chunk_size=int(config.chunk_size),
        n_action_steps=int(config.n_action_steps),
        temporal_ensemble_coeff=config.temporal_ensemble_coeff,
    )


def build_inference_model(policy: Any, preprocessor: Any, postprocessor: Any) -> InferenceACT:
    """Re-express a lerobot ACTPolicy (eval mode) with its processors' statistics baked in."""
    spec = model_spec(policy.config)
    normalizer = _find_step(preprocessor, "NormalizerProcessorStep")
    unnormalizer = _find_step(postprocessor, "UnnormalizerProcessorStep")
    state_norm = Normalize(*_affine(normalizer, STATE_KEY, "STATE", (spec.state_dim,)))
    image_norms = [Normalize(*_affine(normalizer, key, "VISUAL", (3, 1, 1))) for key in spec.image_keys]
    action_unnorm = Unnormalize(*_inverse_affine(unnormalizer, ACTION_KEY, "ACTION", (spec.action_dim,)))
    act = policy.model
    act.eval()
    model = InferenceACT(act, state_norm, image_norms, action_unnorm, list(spec.image_shapes))
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    log.info("re-expressed ACT for inference: %.1f M parameters", n_params / 1e6)
    return model


def inference_parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
